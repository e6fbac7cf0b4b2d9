//! The `qmp_reply` fuzz target's body, kept in the library (as
//! `crate::nbd::fuzz` is) so that `cargo test` replays its corpus on stable.
//! Each line of the input goes through what the QMP reader does with a line
//! from QEMU's socket; any panic is a bug.

use qapi::qmp::{blockdev_add, device_del, qmp_capabilities, query_status};
use serde_json::Value;

use super::qmp::QmpError;
use super::qmp::message::{Message, classify, decode_reply, parse_greeting, parse_line};

/// Decodes a reply as the commands the supervisor sends would.
fn decode_as_commands(body: &Value) {
    let errors = [
        decode_reply::<qmp_capabilities>(body.clone()).err(),
        decode_reply::<blockdev_add>(body.clone()).err(),
        decode_reply::<device_del>(body.clone()).err(),
        decode_reply::<query_status>(body.clone()).err(),
    ];
    let has_error = body.get("error").is_some();
    if has_error {
        assert!(
            errors.iter().all(Option::is_some),
            "an error reply decoded as success"
        );
    }
    for e in errors.into_iter().flatten() {
        // An `error` member is always QEMU refusing, or undecodable.
        if has_error {
            assert!(matches!(e, QmpError::Qemu { .. } | QmpError::Decode { .. }));
        }
        let _ = e.to_string();
    }
}

/// Feeds each line of `data` to the QMP parser, as the greeting and as a
/// message, then decodes events and replies the way their consumers do.
pub fn qmp_reply(data: &[u8]) {
    for line in data.split_inclusive(|&b| b == b'\n') {
        let msg = match parse_line(line) {
            Ok(Some(v)) => v,
            Ok(None) => {
                assert!(line.iter().all(u8::is_ascii_whitespace));
                continue;
            }
            Err(e) => {
                let _ = e.to_string();
                continue;
            }
        };
        if let Ok(g) = parse_greeting(&msg) {
            let _ = (g.version.qemu.major, g.capabilities.len());
        }
        let is_event = msg.get("event").is_some_and(Value::is_string);
        match classify(msg) {
            Message::Event(e) => {
                assert!(is_event);
                let _ = e.typed();
                let _ = e.deleted_device();
            }
            Message::Reply { id, body } => {
                assert!(!is_event);
                assert_eq!(body.get("id").and_then(Value::as_u64), Some(id));
                decode_as_commands(&body);
            }
            Message::Other(v) => {
                assert!(!is_event);
                assert!(v.get("id").and_then(Value::as_u64).is_none());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_trivial_inputs() {
        for d in [&b""[..], b"\n", b"{", b"{}\n[]\n\"x\"\n", &[0xff; 64]] {
            qmp_reply(d);
        }
    }
}
