//! The `coder-sim serve` command: its JSON line, config files, stdin
//! control commands and clean exit on SIGTERM.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

async fn get(url: &str, token: &str) -> Value {
    let text = reqwest::Client::new()
        .get(url)
        .header("Coder-Session-Token", token)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    serde_json::from_str(&text).expect("json")
}

#[tokio::test]
async fn serve_prints_config_and_obeys_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("coderv2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_coder-sim"))
        .args(["serve", "--workspace", "dev", "--workspace", "old:stopped"])
        .args([
            "--agent",
            "dev",
            "--agent",
            "main",
            "--build-time-ms",
            "200",
        ])
        .arg("--config-dir")
        .arg(&cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stdin = child.stdin.take().unwrap();
    let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap();
    let url = info["url"].as_str().unwrap().to_string();
    let token = info["token"].as_str().unwrap().to_string();
    assert!(info["workspaces"]["dev"]["main"]
        .as_str()
        .unwrap()
        .starts_with("tcp://127.0.0.1:"));
    assert!(info["workspaces"]["old"]["dev"].is_string());
    assert_eq!(std::fs::read_to_string(cfg.join("url")).unwrap(), url);
    assert_eq!(std::fs::read_to_string(cfg.join("session")).unwrap(), token);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg), 0o700);
    assert_eq!(mode(&cfg.join("session")), 0o600);

    let ws_url = format!("{url}/api/v2/users/me/workspace/dev");
    assert_eq!(
        get(&ws_url, &token).await["latest_build"]["status"],
        "running"
    );

    stdin
        .write_all(b"status dev main disconnected\nnonsense\nstop dev\n")
        .await
        .unwrap();
    let mut acks = Vec::new();
    for _ in 0..3 {
        let l = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        acks.push(l);
    }
    assert_eq!(acks[0], "ok: status dev main disconnected");
    assert!(acks[1].starts_with("error: nonsense"), "{acks:?}");
    assert_eq!(acks[2], "ok: stop dev");
    let mut status = String::new();
    for _ in 0..100 {
        status = get(&ws_url, &token).await["latest_build"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if status == "stopped" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "stopped");

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn serve_takes_tailnet_faults_and_a_second_derp_region() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coder-sim"))
        .args(["serve", "--agent-derp-region", "10001"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stdin = child.stdin.take().unwrap();
    let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let info: Value = serde_json::from_str(&line).unwrap();
    let url = info["url"].as_str().unwrap().to_string();
    let token = info["token"].as_str().unwrap().to_string();
    let conn_url = format!("{url}/api/v2/workspaceagents/connection");
    let conn = get(&conn_url, &token).await;
    let region = &conn["derp_map"]["Regions"]["10001"];
    assert_eq!(region["EmbeddedRelay"], false, "{conn}");
    assert_eq!(region["Nodes"][0]["HostName"], "127.0.0.1", "{conn}");
    assert_eq!(conn["derp_force_websockets"], false);

    let cmds = [
        "drop-coordinate",
        "restart-derp",
        "peer-update dev dev lost",
        "peer-update dev dev disconnected",
        "peer-update dev dev gone",
        "peer-update dev nosuch lost",
        "rfh-delay 250",
        "rfh-delay never",
        "rfh-delay soon",
        "force-websockets on",
        "force-websockets maybe",
    ];
    stdin
        .write_all(format!("{}\n", cmds.join("\n")).as_bytes())
        .await
        .unwrap();
    let mut acks = Vec::new();
    for _ in 0..cmds.len() {
        let l = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        acks.push(l);
    }
    let ok = |i: usize| acks[i].starts_with(&format!("ok: {}", cmds[i]));
    let err = |i: usize| acks[i].starts_with(&format!("error: {}", cmds[i]));
    assert_eq!(
        acks[0], "ok: drop-coordinate (0 coordinate connection(s) cut)",
        "{acks:?}"
    );
    assert!(
        ok(1) && acks[1].contains("DERP connection(s) dropped"),
        "{acks:?}"
    );
    assert_eq!(
        acks[2],
        "ok: peer-update dev dev lost (sent to 0 client(s))"
    );
    assert!(ok(3), "{acks:?}");
    assert!(err(4) && err(5), "{acks:?}");
    assert!(ok(6) && ok(7) && err(8), "{acks:?}");
    assert!(ok(9) && err(10), "{acks:?}");
    assert_eq!(get(&conn_url, &token).await["derp_force_websockets"], true);

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
