//! Property tests for everything that parses untrusted input: host names,
//! the watch stream's SSE framing, coderd's JSON (and the readiness decision
//! on whatever it decodes to), and header, CSV, URL and duration parsing.
//! Nothing may panic, and each parser has a property beyond that.
//!
//! Case counts are modest so `cargo test` stays fast; `PROPTEST_CASES`
//! overrides them all for a longer run (see README, "Fuzzing").

use coder_proxy::cli::{parse_csv_record, parse_duration, WaitMode};
use coder_proxy::coderd::models::{ErrorBody, Workspace};
use coder_proxy::coderd::sse::{Event, Parser, TooLarge};
use coder_proxy::coderd::{check_workspace, one_line};
use coder_proxy::readiness::{decide, Decision, Policy};
use coder_proxy::settings::{parse_header, parse_url};
use coder_proxy::target::{self, Target};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Value};

/// `cases` unless `PROPTEST_CASES` is set (which the default config reads).
/// A failing input is saved in `tests/props.proptest-regressions` and
/// replayed first on every later run.
fn config(cases: u32) -> ProptestConfig {
    let mut c = if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(cases)
    };
    c.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )));
    c
}

// ---------------------------------------------------------------------------
// Host names.

/// What `target` promises about every name it returns.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

/// Host-like strings: arbitrary text, and text built from name pieces and
/// every separator so the parser's branches are all reached.
fn host() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z0-9_]{1,6}",
        Just("-".to_string()),
        Just("--".to_string()),
        Just(".".to_string()),
        Just("/".to_string()),
        Just("..".to_string()),
        Just("coder".to_string()),
        Just("me".to_string()),
        "[^a-zA-Z0-9]{1,2}",
    ];
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9./_%-]{0,80}",
        prop::collection::vec(piece, 0..12).prop_map(|p| p.concat()),
        "[a-z]{250,260}",
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_]{1,10}(-[a-zA-Z0-9_]{1,10}){0,3}"
}

fn a_target() -> impl Strategy<Value = Target> {
    (
        prop_oneof![Just("me".to_string()), name()],
        name(),
        prop::option::of(name()),
    )
        .prop_map(|(owner, workspace, agent)| Target {
            owner,
            workspace,
            agent,
        })
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn host_parse_never_panics_and_yields_valid_names(
        h in host(),
        prefix in prop::option::of("[a-z.-]{0,10}"),
        suffix in "[a-z.]{0,8}",
    ) {
        match target::parse(&h, prefix.as_deref(), &suffix) {
            Ok(t) => {
                prop_assert!(valid_name(&t.owner), "owner {:?} from {:?}", t.owner, h);
                prop_assert!(valid_name(&t.workspace), "workspace {:?} from {:?}", t.workspace, h);
                if let Some(a) = &t.agent {
                    prop_assert!(valid_name(a), "agent {:?} from {:?}", a, h);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("invalid host name"));
                prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
                prop_assert!(msg.chars().count() < 600, "{} chars", msg.chars().count());
            }
        }
    }

    #[test]
    fn every_rendering_of_a_target_parses_back(t in a_target()) {
        let (o, w) = (&t.owner, &t.workspace);
        let mut forms = vec![];
        match &t.agent {
            Some(a) => {
                forms.push((format!("{o}--{w}--{a}"), None));
                forms.push((format!("{o}--{w}--{a}.coder"), None));
                forms.push((format!("{o}/{w}.{a}"), None));
                forms.push((format!("{o}--{w}.{a}.coder"), None));
                forms.push((format!("{a}.{w}.{o}.coder"), None));
                forms.push((format!("coder-vscode.example.com--{o}--{w}.{a}"), Some("coder-vscode.example.com--")));
                if o == "me" {
                    forms.push((format!("{w}.{a}.coder"), None));
                }
            }
            None => {
                forms.push((format!("{o}--{w}"), None));
                forms.push((format!("{o}--{w}.coder"), None));
                forms.push((format!("{o}/{w}"), None));
                forms.push((format!("coder.{o}/{w}"), Some("coder.")));
                if o == "me" {
                    forms.push((format!("{w}.coder"), None));
                    forms.push((w.clone(), None));
                }
            }
        }
        for (host, prefix) in forms {
            let got = target::parse(&host, prefix, "coder");
            prop_assert_eq!(got.as_ref(), Ok(&t), "host {:?}", host);
        }
    }
}

// ---------------------------------------------------------------------------
// The watch stream's SSE parser.

/// Feed `bytes` cut at `cuts`; events until the first error, and the error.
fn feed_split(max: usize, bytes: &[u8], cuts: &[Index]) -> (Vec<Event>, Option<TooLarge>) {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    let mut p = Parser::new(max);
    let mut events = Vec::new();
    for w in at.windows(2) {
        match p.feed(&bytes[w[0]..w[1]]) {
            Ok(ev) => events.extend(ev),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

/// SSE-ish bytes: field names, line ends of every kind, and junk.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"event: ".to_vec()),
        Just(b"event:data".to_vec()),
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"id: 1".to_vec()),
        Just(b": comment".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"{\"id\":\"w\"}".to_vec()),
        "[a-z{}\" :]{0,12}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec(Just(0xffu8), 0..64),
    ];
    prop_oneof![
        prop::collection::vec(piece, 0..40).prop_map(|p| p.concat()),
        prop::collection::vec(any::<u8>(), 0..2000),
    ]
}

/// One well-formed event and its wire form in one line-ending style.
fn wire_event() -> impl Strategy<Value = (Event, Vec<u8>)> {
    (
        "[a-z]{1,8}",
        prop::collection::vec("[^\r\n]{0,20}", 1..4),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
        prop::collection::vec(
            prop::sample::select(vec![
                ": keep-alive",
                "id: 42",
                "retry: 1000",
                "x-unknown: 1",
            ]),
            0..3,
        ),
    )
        .prop_map(|(kind, lines, eol, extra)| {
            let mut wire = String::new();
            for x in &extra {
                wire.push_str(x);
                wire.push_str(eol);
            }
            wire.push_str(&format!("event: {kind}{eol}"));
            for l in &lines {
                wire.push_str(&format!("data: {l}{eol}"));
            }
            wire.push_str(eol);
            (
                Event {
                    kind,
                    data: lines.join("\n"),
                },
                wire.into_bytes(),
            )
        })
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn sse_chunk_boundaries_do_not_matter(
        bytes in sse_bytes(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
        max in prop_oneof![1usize..300, Just(1usize << 20)],
    ) {
        let whole = Parser::new(max).feed(&bytes);
        let (split, err) = feed_split(max, &bytes, &cuts);
        match whole {
            Ok(events) => {
                prop_assert_eq!(err, None);
                prop_assert_eq!(&events, &split);
                // The cap holds for every event it lets through.
                for e in &events {
                    prop_assert!(e.data.len() <= max, "data {} > {}", e.data.len(), max);
                    prop_assert!(e.kind.len() <= max, "kind {} > {}", e.kind.len(), max);
                }
            }
            Err(e) => prop_assert_eq!(err, Some(e)),
        }
    }

    #[test]
    fn sse_well_formed_events_come_back_exactly(
        evs in prop::collection::vec(wire_event(), 0..8),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let wire: Vec<u8> = evs.iter().flat_map(|(_, w)| w.clone()).collect();
        let want: Vec<Event> = evs.into_iter().map(|(e, _)| e).collect();
        let (got, err) = feed_split(1 << 20, &wire, &cuts);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn sse_a_line_longer_than_the_cap_is_refused(
        max in 1usize..4096,
        extra in 1usize..64,
        fill in prop::sample::select(vec![b'a', 0xff, b'{', b' ']),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let mut bytes = b"data: ".to_vec();
        bytes.extend(std::iter::repeat_n(fill, max + extra));
        let (events, err) = feed_split(max, &bytes, &cuts);
        prop_assert!(events.is_empty());
        prop_assert_eq!(err, Some(TooLarge(max)));
    }
}

// ---------------------------------------------------------------------------
// coderd JSON: decoding never panics, nor does anything downstream of it.

/// A workspace as coderd (and coder-sim) renders it, trimmed.
fn workspace_json() -> Value {
    json!({
        "id": "0b8c5d0e-1c1e-4a55-9f63-3f0d2c8b6a11",
        "created_at": "2026-01-01T00:00:00Z",
        "owner_id": "8f1e1a52-35b4-4f55-8e2a-0d5c6c0f2b3a",
        "owner_name": "alice",
        "name": "dev",
        "template_active_version_id": "c1d6a3f2-8f7b-4b9e-9d7c-2a1b3c4d5e6f",
        "template_require_active_version": false,
        "automatic_updates": "never",
        "outdated": false,
        "dormant_at": null,
        "health": {"healthy": true, "failing_agents": []},
        "latest_build": {
            "id": "6e0f1d2c-3b4a-5968-7a8b-9c0d1e2f3a4b",
            "build_number": 3,
            "transition": "start",
            "status": "running",
            "template_version_id": "c1d6a3f2-8f7b-4b9e-9d7c-2a1b3c4d5e6f",
            "job": {
                "id": "1a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d",
                "status": "succeeded",
                "error": null,
                "completed_at": "2026-01-01T00:00:05Z"
            },
            "resources": [{
                "name": "dev",
                "agents": [{
                    "id": "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
                    "name": "dev",
                    "status": "connected",
                    "lifecycle_state": "ready",
                    "troubleshooting_url": "https://coder.com/docs",
                    "scripts": [{"display_name": "setup", "start_blocks_login": true, "run_on_start": true, "log_source_id": "s1"}],
                    "log_sources": [{"id": "s1", "display_name": "setup"}]
                }]
            }]
        }
    })
}

/// Field names coderd uses, so generated objects hit real fields often.
const FIELDS: &[&str] = &[
    "id",
    "name",
    "owner_name",
    "latest_build",
    "build_number",
    "transition",
    "status",
    "job",
    "completed_at",
    "error",
    "resources",
    "agents",
    "lifecycle_state",
    "scripts",
    "start_blocks_login",
    "log_sources",
    "dormant_at",
    "template_active_version_id",
    "template_require_active_version",
    "automatic_updates",
    "message",
    "detail",
    "validations",
    "field",
];
/// Values coderd sends, plus near misses.
const WORDS: &[&str] = &[
    "",
    "start",
    "stop",
    "delete",
    "running",
    "stopped",
    "failed",
    "pending",
    "starting",
    "stopping",
    "canceling",
    "canceled",
    "deleting",
    "deleted",
    "succeeded",
    "connected",
    "connecting",
    "disconnected",
    "timeout",
    "created",
    "ready",
    "start_timeout",
    "start_error",
    "shutting_down",
    "off",
    "always",
    "never",
    "Running",
    "hibernating",
    "dev",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(FIELDS).prop_map(String::from),
                        any::<String>()
                    ],
                    inner
                ),
                0..8,
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Replace the value at a random path of `v` with `new`.
fn mutate(v: &mut Value, path: &[Index], new: Value) {
    match (path.split_first(), v) {
        (Some((i, rest)), Value::Object(m)) if !m.is_empty() => {
            let k = m.keys().nth(i.index(m.len())).unwrap().clone();
            mutate(m.get_mut(&k).unwrap(), rest, new)
        }
        (Some((i, rest)), Value::Array(a)) if !a.is_empty() => {
            let n = a.len();
            mutate(&mut a[i.index(n)], rest, new)
        }
        (_, v) => *v = new,
    }
}

/// Everything the proxy does with a decoded workspace, none of which may
/// panic; a failure is one line.
fn use_workspace(ws: Workspace) -> Result<(), TestCaseError> {
    let _ = check_workspace(ws.clone());
    let connected = coder_proxy::coderd::models::WorkspaceBuild {
        id: "6e0f1d2c-3b4a-5968-7a8b-9c0d1e2f3a4b".into(),
        build_number: 3,
        ..Default::default()
    };
    let _ = coder_proxy::session::close_reason(&connected, &ws);
    let _ = coder_proxy::session::close_reason(&ws.latest_build, &ws);
    let _ = ws.latest_build.agents();
    for agent in [None, Some("dev"), Some("nope")] {
        for autostart in [true, false] {
            for wait in [WaitMode::Yes, WaitMode::No, WaitMode::Auto] {
                let t = Target {
                    owner: "me".into(),
                    workspace: "dev".into(),
                    agent: agent.map(Into::into),
                };
                if let Decision::Fail(msg) = decide(&ws, &t, &Policy { autostart, wait }) {
                    prop_assert!(!msg.contains('\n'), "{:?}", msg);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn arbitrary_json_decodes_or_fails_cleanly(v in json_value()) {
        if let Ok(ws) = serde_json::from_value::<Workspace>(v.clone()) {
            use_workspace(ws)?;
        }
        let _ = serde_json::from_value::<ErrorBody>(v.clone());
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Ok(ws) = serde_json::from_slice::<Workspace>(&bytes) {
            use_workspace(ws)?;
        }
    }

    #[test]
    fn a_realistic_workspace_with_one_field_changed(
        path in prop::collection::vec(any::<Index>(), 0..6),
        new in json_value(),
    ) {
        let mut v = workspace_json();
        mutate(&mut v, &path, new);
        if let Ok(ws) = serde_json::from_value::<Workspace>(v) {
            use_workspace(ws)?;
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(ws) = serde_json::from_slice::<Workspace>(&bytes) {
            use_workspace(ws)?;
        }
        let _ = serde_json::from_slice::<ErrorBody>(&bytes);
    }
}

#[test]
fn the_realistic_workspace_decodes_and_connects() {
    let ws: Workspace = serde_json::from_value(workspace_json()).unwrap();
    let ws = check_workspace(ws).unwrap();
    let t = target::parse("dev", None, "coder").unwrap();
    let d = decide(
        &ws,
        &t,
        &Policy {
            autostart: true,
            wait: WaitMode::No,
        },
    );
    assert!(matches!(d, Decision::Connect { .. }), "{d:?}");
}

// ---------------------------------------------------------------------------
// Headers, CSV, URLs, durations, one-line messages.

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn parse_header_never_echoes_the_value(
        key in prop_oneof!["[A-Za-z0-9_-]{0,12}", "[^=]{0,20}"],
        before in "[^=]{0,6}",
        junk in prop_oneof!["", "[\\x00-\\x1f\\x7f]{1,3}", "[^\\x00]{0,4}"],
        after in ".{0,8}",
    ) {
        prop_assume!(!key.contains("S3CR3T"));
        let value = format!("{before}S3CR3T{junk}{after}");
        let line = format!("{key}={value}");
        match parse_header(&line) {
            Ok((name, v)) => {
                prop_assert_eq!(name.as_str(), key.trim().to_ascii_lowercase());
                prop_assert_eq!(v.as_bytes(), value.as_bytes());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(!msg.contains("S3CR3T"), "{:?}", msg);
                prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
            }
        }
    }

    #[test]
    fn parse_header_never_panics(line in any::<String>()) {
        if let Err(e) = parse_header(&line) {
            let msg = format!("{e:#}");
            prop_assert!(!msg.chars().any(char::is_control), "{:?}", msg);
            prop_assert!(msg.chars().count() < 600, "{:?}", msg);
        }
    }

    #[test]
    fn csv_urls_and_durations_never_panic(s in any::<String>(), t in "[0-9.]{0,6}(ms|s|m|h|x|)[0-9.]{0,4}(ms|s|m|h|)") {
        let _ = parse_csv_record(&s);
        if let Ok(u) = parse_url(&s) {
            prop_assert!(matches!(u.scheme(), "http" | "https"));
            prop_assert!(u.host_str().is_some_and(|h| !h.is_empty()));
        }
        let _ = parse_duration(&s);
        let _ = parse_duration(&t);
    }

    #[test]
    fn one_line_is_one_line(s in any::<String>(), max in 0usize..300) {
        let out = one_line(&s, max);
        prop_assert!(!out.chars().any(char::is_control));
        prop_assert!(out.chars().count() <= max + 1);
    }
}
