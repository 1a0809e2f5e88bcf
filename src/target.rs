//! Host name → `Target {owner, workspace, agent}`.
//!
//! Accepts every form `coder ssh` accepts (reference §1): prefix or suffix
//! stripping, `ws`, `owner/ws`, `owner--ws`, `ws.agent`, `owner/ws.agent`,
//! `owner--ws--agent`, and the Coder Connect order `agent.ws.owner`. Unlike
//! the Go CLI it validates every part, so a typo fails here with a message
//! naming the accepted forms instead of as a confusing 404 later.

use std::fmt;

/// The owner that coderd resolves to the authenticated user.
pub const ME: &str = "me";

/// What a host name names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Owner user name, or `me`.
    pub owner: String,
    pub workspace: String,
    /// Agent name when the host names one.
    pub agent: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.workspace)?;
        if let Some(a) = &self.agent {
            write!(f, ".{a}")?;
        }
        Ok(())
    }
}

/// A host name we cannot interpret; a usage error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host name {host:?}: {reason}; use ws, owner/ws, owner--ws, ws.agent, owner--ws--agent or agent.ws.owner (optionally with the .<suffix> or prefix from your ssh config)")]
pub struct HostError {
    pub host: String,
    pub reason: String,
}

const MAX_HOST_LEN: usize = 253;
const MAX_NAME_LEN: usize = 64;

/// Parse an OpenSSH `%h` into a target.
pub fn parse(host: &str, prefix: Option<&str>, suffix: &str) -> Result<Target, HostError> {
    let err = |reason: &str| HostError {
        host: printable(host),
        reason: reason.to_string(),
    };
    if host.is_empty() {
        return Err(err("it is empty"));
    }
    if host.len() > MAX_HOST_LEN {
        return Err(err("it is longer than 253 characters"));
    }
    if !host.is_ascii() {
        return Err(err("it contains non-ASCII characters"));
    }
    let mut rest = host;
    let prefix = prefix.filter(|p| !p.is_empty());
    let suffix = suffix.trim_start_matches('.');
    match prefix {
        Some(p) if host.starts_with(p) => rest = &host[p.len()..],
        _ => {
            if !suffix.is_empty() {
                let dotted = format!(".{suffix}");
                if let Some(stripped) = host.strip_suffix(&dotted) {
                    rest = stripped;
                }
            }
        }
    }
    if rest.is_empty() {
        return Err(err("nothing is left after removing the prefix or suffix"));
    }

    let has_slash = rest.contains('/');
    let has_dash2 = rest.contains("--");
    let has_dot = rest.contains('.');
    let parts = split_parts(rest).map_err(|r| err(&r))?;
    let (owner, workspace, agent) = match parts.as_slice() {
        [ws] => (None, *ws, None),
        [a, b] if has_dot && !has_slash && !has_dash2 => (None, *a, Some(*b)),
        [a, b] if !has_dot => (Some(*a), *b, None),
        [_, _] => return Err(err("it mixes separators ambiguously")),
        // The Coder Connect order `agent.ws.owner`, used when only dots appear.
        [a, b, c] if !has_slash && !has_dash2 => (Some(*c), *b, Some(*a)),
        [a, b, c] => (Some(*a), *b, Some(*c)),
        _ => return Err(err("it has more than three parts")),
    };

    for (what, name) in [
        ("owner", owner),
        ("workspace", Some(workspace)),
        ("agent", agent),
    ] {
        if let Some(n) = name {
            validate_name(n).map_err(|r| err(&format!("{what} name {n:?} {r}")))?;
        }
    }
    Ok(Target {
        owner: owner.unwrap_or(ME).to_string(),
        workspace: workspace.to_string(),
        agent: agent.map(str::to_string),
    })
}

/// Split on the regex `[/.]+|--` without a regex engine.
fn split_parts(s: &str) -> Result<Vec<&str>, String> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let sep_len = if bytes[i] == b'/' || bytes[i] == b'.' {
            let mut j = i;
            while j < bytes.len() && (bytes[j] == b'/' || bytes[j] == b'.') {
                j += 1;
            }
            j - i
        } else if bytes[i] == b'-' && bytes.get(i + 1) == Some(&b'-') {
            2
        } else {
            0
        };
        if sep_len > 0 {
            if sep_len > 1 && bytes[i] != b'-' {
                return Err("it has repeated separators".into());
            }
            parts.push(&s[start..i]);
            i += sep_len;
            start = i;
        } else {
            i += 1;
        }
    }
    parts.push(&s[start..]);
    if parts.iter().any(|p| p.is_empty()) {
        return Err("it has an empty part".into());
    }
    Ok(parts)
}

/// Coder names: letters, digits and single inner hyphens (or a UUID).
fn validate_name(n: &str) -> Result<(), &'static str> {
    if n.len() > MAX_NAME_LEN {
        return Err("is too long");
    }
    let ok_chars = n
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok_chars {
        return Err("may contain only letters, digits, '-' and '_'");
    }
    if n.starts_with('-') || n.ends_with('-') {
        return Err("may not start or end with '-'");
    }
    Ok(())
}

/// Quote a host for messages without echoing control characters.
fn printable(host: &str) -> String {
    let mut s: String = host
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if host.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Pick the agent the target names from `(name, id)` pairs.
pub fn choose_agent<'a, T>(
    agents: &'a [T],
    name_of: impl Fn(&T) -> (&str, &str),
    workspace: &str,
    wanted: Option<&str>,
) -> Result<&'a T, String> {
    if agents.is_empty() {
        return Err(format!("workspace {workspace:?} has no agents"));
    }
    let mut names: Vec<&str> = agents.iter().map(|a| name_of(a).0).collect();
    names.sort_unstable();
    let list = format!("[{}]", names.join(" "));
    match wanted {
        Some(w) => agents
            .iter()
            .find(|a| {
                let (name, id) = name_of(a);
                name == w || id == w
            })
            .ok_or_else(|| format!("agent not found by name {w:?}, available agents: {list}")),
        None if agents.len() == 1 => Ok(&agents[0]),
        None => Err(format!(
            "multiple agents found, please specify the agent name, available agents: {list} (e.g. ssh {}.{}.<suffix>)",
            workspace, names[0]
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(owner: &str, ws: &str, agent: Option<&str>) -> Target {
        Target {
            owner: owner.into(),
            workspace: ws.into(),
            agent: agent.map(Into::into),
        }
    }

    #[test]
    fn forms() {
        let cases: &[(&str, Option<&str>, Target)] = &[
            ("ws.coder", None, t("me", "ws", None)),
            ("ws", None, t("me", "ws", None)),
            ("encoder", None, t("me", "encoder", None)),
            ("alice/ws", None, t("alice", "ws", None)),
            ("alice--ws", None, t("alice", "ws", None)),
            ("ws.main", None, t("me", "ws", Some("main"))),
            ("ws.main.coder", None, t("me", "ws", Some("main"))),
            ("alice/ws.main", None, t("alice", "ws", Some("main"))),
            ("alice--ws--main", None, t("alice", "ws", Some("main"))),
            ("alice--ws.main", None, t("alice", "ws", Some("main"))),
            ("alice/ws--main", None, t("alice", "ws", Some("main"))),
            ("main.ws.alice.coder", None, t("alice", "ws", Some("main"))),
            ("main.ws.me.coder", None, t("me", "ws", Some("main"))),
            ("coder.ws", Some("coder."), t("me", "ws", None)),
            (
                "coder.alice--ws.dev",
                Some("coder."),
                t("alice", "ws", Some("dev")),
            ),
            (
                "coder-vscode.example.com--alice--ws.dev",
                Some("coder-vscode.example.com--"),
                t("alice", "ws", Some("dev")),
            ),
            ("my-ws.coder", None, t("me", "my-ws", None)),
        ];
        for (host, prefix, want) in cases {
            assert_eq!(&parse(host, *prefix, "coder").unwrap(), want, "{host}");
        }
    }

    #[test]
    fn prefix_wins_over_suffix() {
        assert_eq!(
            parse("coder.ws.coder", Some("coder."), "coder").unwrap(),
            t("me", "ws", Some("coder"))
        );
    }

    #[test]
    fn bad_hosts() {
        let long = "a".repeat(300);
        for host in [
            "",
            long.as_str(),
            "wörk",
            "a/b/c/d",
            "a..b",
            "--",
            "%",
            "ws;rm -rf",
            "$(id)",
            "a b",
            ".coder",
            "coder.",
            "-ws",
            "a/b.c.d",
        ] {
            let r = parse(host, Some("coder."), "coder");
            assert!(r.is_err(), "{host:?} parsed as {r:?}");
            let msg = r.unwrap_err().to_string();
            assert!(msg.starts_with("invalid host name"), "{msg}");
            assert!(!msg.contains('\n'));
        }
    }

    #[test]
    fn agent_choice() {
        let agents = vec![("main", "id1"), ("dev", "id2")];
        fn f<'a>(a: &'a (&'static str, &'static str)) -> (&'a str, &'a str) {
            (a.0, a.1)
        }
        assert_eq!(
            choose_agent(&agents, f, "ws", Some("dev")).unwrap().1,
            "id2"
        );
        assert_eq!(
            choose_agent(&agents, f, "ws", Some("id1")).unwrap().0,
            "main"
        );
        let e = choose_agent(&agents, f, "ws", Some("x")).unwrap_err();
        assert_eq!(
            e,
            "agent not found by name \"x\", available agents: [dev main]"
        );
        let e = choose_agent(&agents, f, "ws", None).unwrap_err();
        assert!(e.starts_with(
            "multiple agents found, please specify the agent name, available agents: [dev main]"
        ));
        let one = vec![("solo", "id")];
        assert_eq!(choose_agent(&one, f, "ws", None).unwrap().0, "solo");
        let none: Vec<(&str, &str)> = vec![];
        assert_eq!(
            choose_agent(&none, f, "ws", None).unwrap_err(),
            "workspace \"ws\" has no agents"
        );
    }
}
