//! The `transfer_to_operator` interface: how a call reaches a human.
//!
//! Without ARI the transfer needs no code here: the session ends the AudioSocket session
//! with `0x00` and records the outcome `Operator`, and the
//! dialplan's next priority (`Queue(operators)`) takes the caller. With ARI, the ARI module
//! implements [`OperatorTransfer`] (move the channel into the queue) and installs it with
//! [`crate::tools::ToolRegistry::with_transfer`]; the session runs it in a spawned task,
//! never on the 20 ms loop, and still falls back to the dialplan if it fails.

use super::http::ToolContext;
use std::future::Future;
use std::pin::Pin;

/// Why an operator transfer failed (the session then falls back to the dialplan).
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    /// The PBX refused or could not be reached.
    #[error("transfer failed: {0}")]
    Failed(String),
}

/// The future an [`OperatorTransfer`] returns.
pub type TransferFuture = Pin<Box<dyn Future<Output = Result<(), TransferError>> + Send>>;

/// Moves a call to the operator queue (implemented by the ARI module).
pub trait OperatorTransfer: Send + Sync + 'static {
    /// Short name for logs and the call record (`ari`).
    fn name(&self) -> &'static str;

    /// Moves `call` (its AudioSocket call id and caller number) to the operators; `reason` is the model's, if it gave one. Resolves
    /// when the PBX has accepted the move; the session then ends the AudioSocket session.
    fn transfer(&self, call: &ToolContext, reason: Option<String>) -> TransferFuture;
}
