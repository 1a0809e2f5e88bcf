//! NaCl box and DERP login cross-check against PyNaCl (libsodium), via
//! `interop/nacl_check.py`: PyNaCl opens a box we sealed and the ClientInfo
//! frame our client actually sent; we open a box PyNaCl sealed and finish
//! the client login with a ServerInfo frame PyNaCl built.
//!
//! Without a Python that can `import nacl` the test skips loudly;
//! `CODER_PROXY_REQUIRE_PYNACL=1` turns the skip into a failure (CI sets
//! it). The interpreter is `$CODER_PROXY_PYTHON`, else the first of
//! `python3`, `/usr/bin/python3` that has the module (Debian's
//! `python3-nacl` lives in the system interpreter).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use coder_tailnet::derp::frame::{kind, FrameReader, CLIENT_INFO_MAX_FRAME_LEN};
use coder_tailnet::derp::key::hex_encode;
use coder_tailnet::derp::{ClientOptions, DerpClient, Frame, NodePrivate, NodePublic};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

fn python_with_nacl() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("CODER_PROXY_PYTHON") {
        candidates.push(p);
    }
    candidates.push("python3".into());
    candidates.push("/usr/bin/python3".into());
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import nacl.public"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

fn python_or_skip() -> Option<String> {
    if let Some(p) = python_with_nacl() {
        return Some(p);
    }
    let msg = "no python3 with PyNaCl (apt-get install python3-nacl, or pip install pynacl); \
               NaCl cross-check SKIPPED";
    if std::env::var("CODER_PROXY_REQUIRE_PYNACL").as_deref() == Ok("1") {
        panic!("{msg} — but CODER_PROXY_REQUIRE_PYNACL=1");
    }
    eprintln!("\n*** SKIP *** {msg}\n");
    None
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn run_script(py: &str, input: &Value) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/nacl_check.py");
    let mut child = Command::new(py)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "nacl_check.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("script JSON")
}

#[tokio::test]
async fn pynacl_opens_ours_and_we_open_theirs() {
    let Some(py) = python_or_skip() else {
        return;
    };
    let client = NodePrivate::generate(); // A
    let server = NodePrivate::generate(); // B

    // Drive a real DerpClient login against a scripted server end so the
    // ClientInfo frame handed to PyNaCl is exactly what the client sends.
    let (client_io, server_io) = tokio::io::duplex(4096);
    let (sr, mut sw) = tokio::io::split(server_io);
    let client_key = client.clone();
    let login = tokio::spawn(async move {
        DerpClient::handshake(client_io, &client_key, ClientOptions::default()).await
    });
    sw.write_all(
        &Frame::ServerKey {
            key: server.public(),
            extra: vec![],
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut reader = FrameReader::new(sr);
    let (k, payload) = reader
        .expect_frame(CLIENT_INFO_MAX_FRAME_LEN)
        .await
        .unwrap();
    assert_eq!(k, kind::CLIENT_INFO);
    let mut client_info_frame = vec![k];
    client_info_frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    client_info_frame.extend_from_slice(&payload);

    let plaintext = b"sealed by rust crypto_box".to_vec();
    let reply_plaintext = b"sealed by libsodium".to_vec();
    let input = json!({
        "a_secret": hex_encode(&client.to_raw()),
        "a_public": client.public().to_untyped_hex(),
        "b_secret": hex_encode(&server.to_raw()),
        "b_public": server.public().to_untyped_hex(),
        "sealed_a_to_b": hex_encode(&client.seal_to(&server.public(), &plaintext)),
        "plaintext": hex_encode(&plaintext),
        "client_info_frame": hex_encode(&client_info_frame),
        "reply_plaintext": hex_encode(&reply_plaintext),
    });
    let out = run_script(&py, &input);

    // What our client put in the box, as libsodium read it.
    assert_eq!(
        out["client_info_json"],
        json!({"version": 2, "CanAckPings": true})
    );

    // We open PyNaCl's box.
    let theirs = unhex(out["sealed_b_to_a"].as_str().unwrap());
    assert_eq!(
        client.open_from(&server.public(), &theirs).unwrap(),
        reply_plaintext
    );
    // …and not with the wrong peer key.
    assert!(client
        .open_from(&NodePublic::from_raw([9; 32]), &theirs)
        .is_none());

    // Finish the login with PyNaCl's ServerInfo frame.
    let si = unhex(out["server_info_frame"].as_str().unwrap());
    sw.write_all(&si).await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), login)
        .await
        .expect("login finished")
        .unwrap()
        .expect("login ok");
    assert_eq!(c.server_key(), server.public());
    assert_eq!(c.server_info().version, 2);
}
