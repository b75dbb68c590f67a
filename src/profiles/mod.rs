//! Agent profiles: a different agent (prompt, voice, language, provider) per call.
//!
//! `[[profiles]]` names agents beside the default `[agent]`; each call picks one from a
//! [`ProfileChoice`] (the dialplan's announce `POST /v1/calls/{uuid}`, the Stasis channel
//! variable `VOICEGATE_PROFILE` or the `Stasis(voicegate,<profile>)` argument, the
//! WebSocket media channel's `v(...)` parameters) and, failing that, from the called number
//! (`[profile_routing.dids]`). [`Profiles::choose`] applies the rules; [`announce`] keeps the
//! announcements of modes 1 and 2 until their call connects. docs/profiles.md has the depth.

pub mod announce;

use crate::agent::SharedAgent;
use crate::agent::config::AgentConfig;
use crate::error::ConfigError;
use crate::guard::ProfileLimits;
use crate::tools::{ToolConfig, ToolRegistry};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The name that always means the top-level `[agent]`.
pub(crate) const DEFAULT_PROFILE: &str = "default";

/// One `[[profiles]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// The name the dialplan chooses it by: letters, digits, `-` and `_`, at most 64
    /// characters, not `default` (that is the top-level `[agent]`).
    pub name: String,
    /// `[profiles.agent]`: its agent, any kind, exactly like the top-level `[agent]`
    /// (instructions, greeting, voice, language are the agent's own keys).
    pub agent: AgentConfig,
    /// Variables every call of this profile starts with (`{name}` placeholders); the call's
    /// own variables override them.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Names of the box's `[[tools]]` this profile's agent gets. When neither this nor
    /// `tools` is set the agent gets all of `[[tools]]`; when either is, exactly the tools
    /// named here plus its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_tools: Option<Vec<String>>,
    /// `[[profiles.tools]]`: tools of this profile alone, every key as in `[[tools]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolConfig>,
    /// `[profiles.limits]`: this profile's own limits, on top of `[guard]`'s.
    #[serde(default)]
    pub limits: ProfileLimits,
}

impl ProfileConfig {
    /// Whether the profile says which tools it has (`use_tools` or `[[profiles.tools]]`);
    /// if not, it has all of the box's `[[tools]]`.
    pub(crate) fn has_own_tool_list(&self) -> bool {
        self.use_tools.is_some() || !self.tools.is_empty()
    }
}

/// What to do with a call whose profile cannot be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Give it the default profile (the top-level `[agent]`), with a warning.
    #[default]
    Default,
    /// Close the call before any agent session starts (the dialplan continues after
    /// `AudioSocket()`; Stasis callers go to the operators).
    Refuse,
}

/// `[profile_routing]`: the DID map and what happens to calls no profile was chosen for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileRoutingConfig {
    /// A call that names a profile nobody configured: `default` (the default) or `refuse`.
    pub unknown_profile: Unmatched,
    /// A call that names no profile and whose called number is not in `dids`: `default`
    /// (the default) or `refuse`.
    pub unannounced: Unmatched,
    /// `[profile_routing.dids]`: called number (exactly as Asterisk gives it, e.g. `${EXTEN}`)
    /// → profile name; used when the call names no profile.
    pub dids: BTreeMap<String, String>,
}

/// Checks `[[profiles]]` and `[profile_routing]`: names valid and unique, each agent valid,
/// each profile's tools and limits valid ([`validate_tools`]), every DID mapped to a
/// profile that exists. `box_tools` is the box's `[[tools]]`.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the key (`profiles[N].name`, `profiles[N].agent…`,
/// `profiles[N].use_tools`, `profiles[N].tools`, `profiles[N].limits…`,
/// `profile_routing.dids`).
pub(crate) fn validate_config(
    profiles: &[ProfileConfig],
    routing: &ProfileRoutingConfig,
    box_tools: &[ToolConfig],
) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in profiles.iter().enumerate() {
        let key = format!("profiles[{i}].name");
        if !valid_name(&p.name) {
            return Err(ConfigError::invalid(
                &key,
                format!(
                    "{:?}: a profile name is 1 to 64 letters, digits, - or _",
                    p.name
                ),
            ));
        }
        if p.name == DEFAULT_PROFILE {
            return Err(ConfigError::invalid(
                &key,
                "\"default\" is the top-level [agent]; give this profile another name",
            ));
        }
        if !seen.insert(p.name.as_str()) {
            return Err(ConfigError::invalid(
                &key,
                format!("{:?} is configured twice", p.name),
            ));
        }
        p.agent.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::invalid(
                &format!("profiles[{i}].{key}"),
                format!("(profile {:?}) {message}", p.name),
            ),
            other => other,
        })?;
        validate_tools(i, p, box_tools)?;
        p.limits.validate(&format!("profiles[{i}].limits"))?;
    }
    for (did, name) in &routing.dids {
        if name != DEFAULT_PROFILE && !seen.contains(name.as_str()) {
            return Err(ConfigError::invalid(
                "profile_routing.dids",
                format!("{did:?} maps to {name:?}, which no [[profiles]] entry names"),
            ));
        }
    }
    Ok(())
}

/// Checks the tools of `profiles[i]` (`p`): every `use_tools` name is one of `box_tools`
/// and listed once, every `[[profiles.tools]]` entry is valid as a `[[tools]]` entry, and
/// no name is both listed and defined.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `profiles[i].use_tools` or `profiles[i].tools`.
pub(crate) fn validate_tools(
    i: usize,
    p: &ProfileConfig,
    box_tools: &[ToolConfig],
) -> Result<(), ConfigError> {
    crate::tools::validate_config(&p.tools).map_err(|e| match e {
        ConfigError::Invalid { message, .. } => ConfigError::invalid(
            &format!("profiles[{i}].tools"),
            format!("(profile {:?}) {message}", p.name),
        ),
        other => other,
    })?;
    let key = format!("profiles[{i}].use_tools");
    let own: Vec<&str> = p
        .tools
        .iter()
        .filter_map(ToolConfig::declared_name)
        .collect();
    let mut listed = std::collections::BTreeSet::new();
    for name in p.use_tools.iter().flatten() {
        if !box_tools
            .iter()
            .any(|t| t.declared_name() == Some(name.as_str()))
        {
            return Err(ConfigError::invalid(
                &key,
                format!(
                    "(profile {:?}) no [[tools]] entry is named {name:?}",
                    p.name
                ),
            ));
        }
        if !listed.insert(name.as_str()) || own.contains(&name.as_str()) {
            return Err(ConfigError::invalid(
                &key,
                format!("(profile {:?}) tool {name:?} is named twice", p.name),
            ));
        }
    }
    Ok(())
}

/// Whether `name` can be a profile name (1–64 of `A-Za-z0-9-_`).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// What the dialplan or the media channel said about a call before it connected; any field
/// may be unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileChoice {
    /// The profile's name (`default` = the top-level `[agent]`).
    pub profile: Option<String>,
    /// The caller's number (`${CALLERID(num)}`).
    pub caller_number: Option<String>,
    /// The caller's name (`${CALLERID(name)}`).
    pub caller_name: Option<String>,
    /// The called number, the DID (`${EXTEN}`).
    pub called_number: Option<String>,
    /// Custom variables for `{placeholders}`.
    #[serde(alias = "vars")]
    pub variables: BTreeMap<String, String>,
}

/// Most custom variables one choice keeps; more are dropped.
pub(crate) const MAX_VARIABLES: usize = 32;
/// Longest variable name and value kept, bytes; longer values are cut at a character
/// boundary, longer names dropped.
pub(crate) const MAX_VARIABLE_BYTES: usize = 512;

impl ProfileChoice {
    /// A choice from `key=value` pairs (URI query or form parameters, already
    /// percent-decoded): `profile`, `caller_number` (or `caller`, as the WebSocket media
    /// channel's `v(caller=…)` names it), `caller_name`, `called_number`, and any
    /// other key as a custom variable (a `var_` prefix is removed). Used by the announce's
    /// form body and by the WebSocket media channel's `v(...)` parameters.
    pub(crate) fn from_uri_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut c = ProfileChoice::default();
        for (k, v) in params {
            let v = (!v.is_empty()).then(|| v.to_owned());
            match k {
                "profile" | "VOICEGATE_PROFILE" => c.profile = v,
                "caller_number" | "caller" => c.caller_number = v,
                "caller_name" => c.caller_name = v,
                "called_number" => c.called_number = v,
                _ => {
                    let k = k.strip_prefix("var_").unwrap_or(k);
                    c.variables.insert(k.to_owned(), v.unwrap_or_default());
                }
            }
        }
        c.bounded()
    }

    /// Bounds the variables ([`MAX_VARIABLES`], [`MAX_VARIABLE_BYTES`]) and the other fields.
    pub(crate) fn bounded(mut self) -> Self {
        let cut = |s: &mut String| {
            if s.len() > MAX_VARIABLE_BYTES {
                let mut end = MAX_VARIABLE_BYTES;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
            }
        };
        for f in [
            &mut self.profile,
            &mut self.caller_number,
            &mut self.caller_name,
            &mut self.called_number,
        ]
        .into_iter()
        .flatten()
        {
            cut(f);
        }
        self.variables
            .retain(|k, _| !k.is_empty() && k.len() <= MAX_VARIABLE_BYTES);
        while self.variables.len() > MAX_VARIABLES {
            self.variables.pop_last();
        }
        self.variables.values_mut().for_each(cut);
        self
    }

    /// Fills the fields this choice leaves unset from `other`; variables merge, this
    /// choice's winning.
    pub(crate) fn or(mut self, other: ProfileChoice) -> Self {
        self.profile = self.profile.or(other.profile);
        self.caller_number = self.caller_number.or(other.caller_number);
        self.caller_name = self.caller_name.or(other.caller_name);
        self.called_number = self.called_number.or(other.called_number);
        for (k, v) in other.variables {
            self.variables.entry(k).or_insert(v);
        }
        self
    }
}

/// The profile a call runs with.
#[derive(Debug, Clone)]
pub(crate) struct Chosen {
    /// Its name (`default` for the top-level `[agent]`).
    pub(crate) name: String,
    /// Its agent.
    pub(crate) agent: SharedAgent,
    /// The call's variables: the profile's, then `caller_number`, `caller_name`,
    /// `called_number` and `profile`, then the call's custom ones.
    pub(crate) variables: BTreeMap<String, String>,
    /// The tools its agent gets; `None`: the box's `[[tools]]`.
    pub(crate) tools: Option<Arc<ToolRegistry>>,
    /// Its own limits (`[profiles.limits]`; none for the default).
    pub(crate) limits: ProfileLimits,
}

/// Why [`Profiles::choose`] refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The call named a profile nobody configured (`unknown_profile = "refuse"`).
    #[error("unknown profile {0:?}")]
    Unknown(String),
    /// The call named no profile and its DID is not mapped (`unannounced = "refuse"`).
    #[error("no profile chosen for this call")]
    Unannounced,
}

impl Refusal {
    /// A metrics label: `unknown_profile` or `no_profile`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Refusal::Unknown(_) => "unknown_profile",
            Refusal::Unannounced => "no_profile",
        }
    }
}

#[derive(Debug, Clone)]
struct Profile {
    agent: SharedAgent,
    variables: BTreeMap<String, String>,
    tools: Option<Arc<ToolRegistry>>,
    limits: ProfileLimits,
}

impl Profile {
    fn new(agent: SharedAgent) -> Self {
        Profile {
            agent,
            variables: BTreeMap::new(),
            tools: None,
            limits: ProfileLimits::default(),
        }
    }
}

/// The profiles new calls choose from: built from the config at start and on every SIGHUP.
#[derive(Debug, Clone)]
pub struct Profiles {
    default: Profile,
    named: BTreeMap<String, Profile>,
    routing: ProfileRoutingConfig,
}

impl Profiles {
    /// Only the default profile, `agent`.
    pub fn single(agent: SharedAgent) -> Self {
        Profiles {
            default: Profile::new(agent),
            named: BTreeMap::new(),
            routing: ProfileRoutingConfig::default(),
        }
    }

    /// The default `agent` plus every `[[profiles]]` entry's agent and tools, built; a
    /// profile's tools are taken from `box_tools` (the box's `[[tools]]`, built) by name
    /// ([`ToolRegistry::for_profile`]).
    ///
    /// # Errors
    /// If a profile's agent or tools cannot be built (an unreadable instructions file, a
    /// missing key, a tool name `box_tools` lacks).
    pub(crate) fn build(
        agent: SharedAgent,
        profiles: &[ProfileConfig],
        routing: &ProfileRoutingConfig,
        box_tools: &ToolRegistry,
    ) -> Result<Self, ConfigError> {
        let mut p = Profiles::single(agent);
        p.routing = routing.clone();
        for c in profiles {
            let agent = crate::agent::from_config(&c.agent).map_err(|e| match e {
                ConfigError::Invalid { key, message } => {
                    ConfigError::invalid(&format!("profiles.{}.{key}", c.name), message)
                }
                other => other,
            })?;
            let tools = if c.has_own_tool_list() {
                let built = box_tools
                    .for_profile(c.use_tools.as_deref(), &c.tools)
                    .map_err(|e| {
                        ConfigError::invalid(&format!("profiles.{}.tools", c.name), e.to_string())
                    })?;
                Some(Arc::new(built))
            } else {
                None
            };
            p.named.insert(
                c.name.clone(),
                Profile {
                    agent,
                    variables: c.variables.clone(),
                    tools,
                    limits: c.limits,
                },
            );
        }
        Ok(p)
    }

    /// With `agent` as a profile named `name` (tests, embedding).
    pub fn with_profile(mut self, name: &str, agent: SharedAgent) -> Self {
        self.named.insert(name.to_owned(), Profile::new(agent));
        self
    }

    /// With `tools` for the profile named `name` (tests, embedding); nothing changes when
    /// no profile has that name.
    pub fn with_tools(mut self, name: &str, tools: ToolRegistry) -> Self {
        if let Some(p) = self.named.get_mut(name) {
            p.tools = Some(Arc::new(tools));
        }
        self
    }

    /// With `limits` for the profile named `name` (tests, embedding); nothing changes when
    /// no profile has that name.
    pub fn with_limits(mut self, name: &str, limits: ProfileLimits) -> Self {
        if let Some(p) = self.named.get_mut(name) {
            p.limits = limits;
        }
        self
    }

    /// With `routing` (the DID map and the refusal rules).
    pub fn with_routing(mut self, routing: ProfileRoutingConfig) -> Self {
        self.routing = routing;
        self
    }

    /// The default profile's agent.
    #[cfg(test)]
    pub(crate) fn default_agent(&self) -> &SharedAgent {
        &self.default.agent
    }

    /// The configured profile names (without `default`).
    #[cfg(test)]
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.named.keys().map(String::as_str)
    }

    /// The profile for a call: the one `choice` names; else the one its called number maps
    /// to; else the default. A name nobody configured and a call with no profile follow
    /// `[profile_routing]` (`unknown_profile`, `unannounced`).
    ///
    /// # Errors
    /// [`Refusal`] when `[profile_routing]` says to refuse the call.
    pub(crate) fn choose(&self, choice: &ProfileChoice) -> Result<Chosen, Refusal> {
        let by_did = || {
            choice
                .called_number
                .as_ref()
                .and_then(|did| self.routing.dids.get(did))
        };
        let name = match choice.profile.as_ref().or_else(by_did) {
            Some(n) if n == DEFAULT_PROFILE => DEFAULT_PROFILE,
            Some(n) if self.named.contains_key(n) => n.as_str(),
            Some(n) => match self.routing.unknown_profile {
                Unmatched::Refuse => return Err(Refusal::Unknown(n.clone())),
                Unmatched::Default => {
                    tracing::warn!(profile = %n, "unknown profile; the call gets the default");
                    DEFAULT_PROFILE
                }
            },
            None => match self.routing.unannounced {
                Unmatched::Refuse => return Err(Refusal::Unannounced),
                Unmatched::Default => DEFAULT_PROFILE,
            },
        };
        let profile = self.named.get(name).unwrap_or(&self.default);
        let mut variables = profile.variables.clone();
        let fixed = [
            ("caller_number", &choice.caller_number),
            ("caller_name", &choice.caller_name),
            ("called_number", &choice.called_number),
        ];
        for (k, v) in fixed {
            variables.insert(k.to_owned(), v.clone().unwrap_or_default());
        }
        variables.insert("profile".to_owned(), name.to_owned());
        for (k, v) in &choice.variables {
            variables.insert(k.clone(), v.clone());
        }
        Ok(Chosen {
            name: name.to_owned(),
            agent: profile.agent.clone(),
            variables,
            tools: profile.tools.clone(),
            limits: profile.limits,
        })
    }
}

#[cfg(test)]
mod tests;
