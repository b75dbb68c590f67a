use super::*;
use crate::agent::config::{EchoConfig, OpenAiRealtimeConfig};
use crate::agent::fill_placeholders;
use std::sync::Arc;

fn echo(delay_ms: u64) -> SharedAgent {
    Arc::new(crate::agent::echo::EchoAgent::new(
        EchoConfig { delay_ms }.delay(),
    ))
}

fn profiles(routing: ProfileRoutingConfig) -> Profiles {
    Profiles::single(echo(1))
        .with_profile("sales", echo(2))
        .with_profile("service", echo(3))
        .with_routing(routing)
}

fn named(p: &str) -> ProfileChoice {
    ProfileChoice {
        profile: Some(p.into()),
        ..ProfileChoice::default()
    }
}

#[test]
fn the_named_profile_wins_then_the_did_then_the_default() {
    let routing = ProfileRoutingConfig {
        dids: [("200".to_owned(), "service".to_owned())].into(),
        ..ProfileRoutingConfig::default()
    };
    let p = profiles(routing);
    let mut c = named("sales");
    c.called_number = Some("200".into());
    assert_eq!(p.choose(&c).unwrap().name, "sales");
    c.profile = None;
    assert_eq!(p.choose(&c).unwrap().name, "service");
    c.called_number = Some("300".into());
    assert_eq!(p.choose(&c).unwrap().name, "default");
    assert_eq!(p.choose(&named("default")).unwrap().name, "default");
}

#[test]
fn unknown_and_unannounced_follow_the_routing_rules() {
    let p = profiles(ProfileRoutingConfig::default());
    assert_eq!(p.choose(&named("nope")).unwrap().name, "default");
    assert_eq!(p.choose(&ProfileChoice::default()).unwrap().name, "default");
    let p = profiles(ProfileRoutingConfig {
        unknown_profile: Unmatched::Refuse,
        unannounced: Unmatched::Refuse,
        ..ProfileRoutingConfig::default()
    });
    assert_eq!(
        p.choose(&named("nope")).unwrap_err(),
        Refusal::Unknown("nope".into())
    );
    assert_eq!(
        p.choose(&ProfileChoice::default()).unwrap_err(),
        Refusal::Unannounced
    );
    assert_eq!(p.choose(&named("sales")).unwrap().name, "sales");
}

#[test]
fn variables_merge_profile_then_call_details_then_custom() {
    let mut p = profiles(ProfileRoutingConfig::default());
    p.named.get_mut("sales").unwrap().variables = [
        ("team".to_owned(), "Berlin".to_owned()),
        ("tier".to_owned(), "basic".to_owned()),
    ]
    .into();
    let mut c = named("sales");
    c.caller_number = Some("+4930123".into());
    c.called_number = Some("200".into());
    c.variables.insert("tier".into(), "gold".into());
    let v = p.choose(&c).unwrap().variables;
    assert_eq!(v["team"], "Berlin");
    assert_eq!(v["tier"], "gold");
    assert_eq!(v["caller_number"], "+4930123");
    assert_eq!(v["called_number"], "200");
    assert_eq!(v["caller_name"], "");
    assert_eq!(v["profile"], "sales");
}

#[test]
fn placeholders_are_filled_and_other_braces_kept() {
    let vars: BTreeMap<String, String> = [
        ("caller_number".to_owned(), "+4930123".to_owned()),
        ("customer".to_owned(), "C-17".to_owned()),
    ]
    .into();
    // A lone opening brace at the end (`\x7b`, so brace-counting tools stay balanced).
    assert_eq!(
        fill_placeholders(
            "Caller {caller_number}, customer {customer}; {unknown} {\"json\": 1} \x7b",
            &vars
        ),
        "Caller +4930123, customer C-17; {unknown} {\"json\": 1} \x7b"
    );
}

#[test]
fn uri_params_become_a_choice() {
    let c = ProfileChoice::from_uri_params([
        ("profile", "sales"),
        ("caller", "+4930123"),
        ("called_number", "200"),
        ("var_customer", "C-17"),
        ("tier", "gold"),
    ]);
    assert_eq!(c.profile.as_deref(), Some("sales"));
    assert_eq!(c.called_number.as_deref(), Some("200"));
    assert_eq!(c.caller_number.as_deref(), Some("+4930123"));
    assert_eq!(c.variables["customer"], "C-17");
    assert_eq!(c.variables["tier"], "gold");
    let many = (0..100).map(|i| (format!("k{i:03}"), "x".repeat(2000)));
    let many: Vec<(String, String)> = many.collect();
    let c = ProfileChoice::from_uri_params(many.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    assert_eq!(c.variables.len(), MAX_VARIABLES);
    assert!(c.variables.values().all(|v| v.len() == MAX_VARIABLE_BYTES));
}

/// The tables of the config file that profiles read (the whole file is
/// the config module's `Config`, a layer above this one), as strict about unknown keys.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Cfg {
    #[serde(default)]
    tools: Vec<ToolConfig>,
    #[serde(default)]
    profiles: Vec<ProfileConfig>,
    #[serde(default)]
    profile_routing: ProfileRoutingConfig,
}

fn cfg(toml_text: &str) -> Cfg {
    toml::from_str(toml_text).expect("parses")
}

#[test]
fn validation_names_the_bad_key() {
    let bad = |t: &str| {
        let c = cfg(t);
        validate_config(&c.profiles, &c.profile_routing, &c.tools)
            .unwrap_err()
            .to_string()
    };
    let e = bad("[[profiles]]\nname = \"default\"\n[profiles.agent]\nkind = \"echo\"\n");
    assert!(e.contains("profiles[0].name"), "{e}");
    let e = bad("[[profiles]]\nname = \"a b\"\n[profiles.agent]\nkind = \"echo\"\n");
    assert!(e.contains("profiles[0].name"), "{e}");
    let twice = "[[profiles]]\nname = \"x\"\n[profiles.agent]\nkind = \"echo\"\n";
    let e = bad(&format!("{twice}{twice}"));
    assert!(e.contains("profiles[1].name") && e.contains("twice"), "{e}");
    let e = bad(&format!("{twice}[profile_routing.dids]\n\"200\" = \"y\"\n"));
    assert!(
        e.contains("profile_routing.dids") && e.contains("\"y\""),
        "{e}"
    );
    let e = bad(
        "[[profiles]]\nname = \"x\"\n[profiles.agent]\nkind = \"echo\"\ndelay_ms = 999999999\n",
    );
    assert!(e.contains("profiles[0].agent.delay_ms"), "{e}");
    let ok = cfg(&format!(
        "{twice}[profile_routing]\nunknown_profile = \"refuse\"\n[profile_routing.dids]\n\"200\" = \"x\"\n"
    ));
    validate_config(&ok.profiles, &ok.profile_routing, &ok.tools).unwrap();
    assert_eq!(ok.profile_routing.unknown_profile, Unmatched::Refuse);
}

#[test]
fn profile_agents_are_built_per_profile() {
    let mut cfg = OpenAiRealtimeConfig {
        api_key: crate::secret::SecretSource::Inline("k".into()),
        ..OpenAiRealtimeConfig::default()
    };
    cfg.instructions = "Sales.".into();
    let list = vec![ProfileConfig {
        name: "sales".into(),
        agent: AgentConfig::OpenaiRealtime(cfg),
        variables: BTreeMap::new(),
        use_tools: None,
        tools: Vec::new(),
        limits: ProfileLimits::default(),
    }];
    let routing = ProfileRoutingConfig::default();
    let p = Profiles::build(echo(1), &list, &routing, &ToolRegistry::empty()).unwrap();
    assert_eq!(
        p.choose(&named("sales")).unwrap().agent.name(),
        "openai_realtime"
    );
    assert_eq!(p.default_agent().name(), "echo");
    assert_eq!(p.names().collect::<Vec<_>>(), ["sales"]);
}

#[test]
fn the_example_config_parses_and_validates() {
    let text = include_str!("../../examples/voicegate.toml");
    let start = text.find("#[[profiles]]").expect("profiles example");
    let toml: String = text[start..]
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix('#').unwrap_or(l)))
        .collect();
    let mut c = cfg(&format!("{BOX_TOOLS}\n{toml}"));
    // The key comes from the environment ({ env = "OPENAI_API_KEY" }, the default).
    if let AgentConfig::OpenaiRealtime(a) = &mut c.profiles[0].agent {
        a.api_key = crate::secret::SecretSource::Inline("k".into());
    }
    validate_config(&c.profiles, &c.profile_routing, &c.tools).unwrap();
    assert_eq!(c.profiles[0].name, "sales");
    assert_eq!(c.profiles[0].variables["team"], "Berlin sales");
    let AgentConfig::OpenaiRealtime(a) = &c.profiles[0].agent else {
        panic!("openai_realtime")
    };
    assert_eq!(a.voice, "cedar");
    let sales = &c.profiles[0];
    assert_eq!(
        sales.use_tools.as_deref().unwrap(),
        ["search_tires", "hangup"]
    );
    assert_eq!(sales.tools[0].declared_name(), Some("book_test_drive"));
    assert_eq!((sales.limits.max_calls, sales.limits.max_call_s), (4, 900));
    assert_eq!(sales.limits.daily_budget_minutes, 120);
    assert_eq!(c.profile_routing.dids["4930200"], "sales");
    assert_eq!(c.profile_routing.unknown_profile, Unmatched::Default);
}

const BOX_TOOLS: &str = r#"
[[tools]]
name = "search_tires"
description = "Find tyres in stock"
url = "http://127.0.0.1:9/tires"
[[tools]]
kind = "hangup"
[[tools]]
kind = "transfer_to_operator"
"#;

fn profile_toml(body: &str) -> String {
    format!(
        "{BOX_TOOLS}\n[[profiles]]\nname = \"sales\"\n{body}\n[profiles.agent]\nkind = \"echo\"\n"
    )
}

#[test]
fn profile_tools_and_limits_are_validated() {
    let bad = |body: &str| {
        let c = cfg(&profile_toml(body));
        validate_config(&c.profiles, &c.profile_routing, &c.tools)
            .unwrap_err()
            .to_string()
    };
    let e = bad("use_tools = [\"hangup\", \"search_tyres\"]");
    assert!(
        e.contains("profiles[0].use_tools") && e.contains("\"search_tyres\""),
        "{e}"
    );
    let e = bad("use_tools = [\"hangup\", \"hangup\"]");
    assert!(
        e.contains("profiles[0].use_tools") && e.contains("twice"),
        "{e}"
    );
    let own = "[[profiles.tools]]\nname = \"book\"\ndescription = \"Book\"\nurl = \"http://127.0.0.1:9/b\"";
    let e = bad(&format!("use_tools = [\"book\"]\n{own}"));
    assert!(e.contains("profiles[0].use_tools"), "{e}");
    let e = bad("[[profiles.tools]]\nname = \"book\"\ndescription = \"Book\"");
    assert!(
        e.contains("profiles[0].tools") && e.contains("needs a url"),
        "{e}"
    );
    let e = bad("[profiles.limits]\nmax_call_s = 5");
    assert!(e.contains("profiles[0].limits.max_call_s"), "{e}");
    let unknown = profile_toml("[profiles.limits]\nmax_calls_at_once = 5");
    assert!(toml::from_str::<Cfg>(&unknown).is_err());
    let ok = cfg(&profile_toml(&format!(
        "use_tools = [\"hangup\"]\n[profiles.limits]\nmax_calls = 2\nmax_call_s = 300\n{own}"
    )));
    validate_config(&ok.profiles, &ok.profile_routing, &ok.tools).unwrap();
    assert_eq!(ok.profiles[0].limits.max_calls, 2);
}

fn tool_names(t: &Option<Arc<ToolRegistry>>) -> Option<Vec<String>> {
    t.as_ref()
        .map(|r| r.specs().into_iter().map(|s| s.name).collect())
}

#[test]
fn a_profile_gets_the_tools_it_names_and_its_own() {
    let own = "[[profiles.tools]]\nname = \"book\"\ndescription = \"Book\"\nurl = \"http://127.0.0.1:9/b\"";
    let text = format!(
        "{}\n[[profiles]]\nname = \"service\"\nuse_tools = []\n[profiles.agent]\nkind = \"echo\"\n\
         [[profiles]]\nname = \"all\"\n[profiles.agent]\nkind = \"echo\"\n",
        profile_toml(&format!(
            "use_tools = [\"transfer_to_operator\", \"search_tires\"]\n{own}"
        ))
    );
    let c = cfg(&text);
    validate_config(&c.profiles, &c.profile_routing, &c.tools).unwrap();
    let box_tools = ToolRegistry::from_config(&c.tools).unwrap();
    let p = Profiles::build(echo(1), &c.profiles, &c.profile_routing, &box_tools).unwrap();
    let sales = p.choose(&named("sales")).unwrap();
    assert_eq!(
        tool_names(&sales.tools).unwrap(),
        ["transfer_to_operator", "search_tires", "book"]
    );
    // An empty list: no tools at all; no list: the box's (None).
    assert_eq!(
        tool_names(&p.choose(&named("service")).unwrap().tools),
        Some(vec![])
    );
    assert_eq!(tool_names(&p.choose(&named("all")).unwrap().tools), None);
    assert_eq!(
        tool_names(&p.choose(&named("default")).unwrap().tools),
        None
    );
    // A name the box's registry lacks fails the build too (a reload against other tools).
    let e = Profiles::build(
        echo(1),
        &c.profiles,
        &c.profile_routing,
        &ToolRegistry::empty(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("profiles.sales.tools"), "{e}");
}
