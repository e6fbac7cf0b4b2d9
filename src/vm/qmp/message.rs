//! QMP messages, sans-IO: a line from QEMU's socket in, a typed message
//! out. The socket code and the `qmp_reply` fuzz target drive the same
//! functions, so nothing QEMU (or an impostor on the socket) sends can make
//! the supervisor panic.

use qapi::Command;
use qapi::qmp::{QMP, QapiCapabilities};
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use super::{QmpError, QmpEvent};

/// Why a line from the QMP socket is not a message.
#[derive(Debug, Error)]
pub enum ParseError {
    /// The line is not valid JSON.
    #[error("QMP sent invalid JSON")]
    Json(#[from] serde_json::Error),
}

/// What one message from QEMU is, as the reader routes it.
#[derive(Clone, Debug)]
pub enum Message {
    /// An asynchronous event, for the subscribers.
    Event(QmpEvent),
    /// A reply (`return` or `error`) to the command with this id.
    Reply {
        /// The id vbd gave the command.
        id: u64,
        /// The whole message; the caller decodes its `return` or `error`.
        body: Value,
    },
    /// Neither: logged and ignored.
    Other(Value),
}

/// Parses one line (a JSON value and its newline); `None` for a blank one.
pub fn parse_line(line: &[u8]) -> Result<Option<Value>, ParseError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(Some(serde_json::from_slice(line)?))
}

/// Sorts a parsed message into event, reply or neither.
pub fn classify(msg: Value) -> Message {
    if let Some(name) = msg.get("event").and_then(Value::as_str) {
        return Message::Event(QmpEvent {
            name: name.to_owned(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            raw: msg,
        });
    }
    match msg.get("id").and_then(Value::as_u64) {
        Some(id) => Message::Reply { id, body: msg },
        None => Message::Other(msg),
    }
}

/// Reads QEMU's greeting: its version and offered capabilities.
pub fn parse_greeting(msg: &Value) -> Result<QMP, QmpError> {
    QapiCapabilities::deserialize(msg)
        .map(|caps| caps.QMP)
        .map_err(|source| QmpError::Greeting {
            greeting: msg.clone(),
            source,
        })
}

/// Turns a reply object (`return` or `error`) into the command's result.
pub fn decode_reply<C: Command>(mut reply: Value) -> Result<C::Ok, QmpError> {
    let command = C::NAME;
    if reply.get("error").is_some() {
        // qapi's Error reads the whole reply object.
        let e: qapi::Error =
            serde_json::from_value(reply).map_err(|source| QmpError::Decode { command, source })?;
        return Err(QmpError::Qemu {
            command,
            class: e.class,
            desc: e.desc,
        });
    }
    let ret = reply
        .get_mut("return")
        .map(Value::take)
        .unwrap_or(Value::Null);
    serde_json::from_value(ret).map_err(|source| QmpError::Decode { command, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_events_replies_and_the_rest() {
        assert!(parse_line(b" \r\n").unwrap().is_none());
        assert!(parse_line(b"{\"return\": \n").is_err());
        let ev = parse_line(br#"{"event": "DEVICE_DELETED", "data": {"device": "vd1", "path": "/x"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#)
            .unwrap()
            .unwrap();
        match classify(ev) {
            Message::Event(e) => {
                assert_eq!(e.name, "DEVICE_DELETED");
                assert_eq!(e.deleted_device().as_deref(), Some("vd1"));
            }
            m => panic!("{m:?}"),
        }
        let reply = parse_line(br#"{"return": {}, "id": 7}"#).unwrap().unwrap();
        assert!(matches!(classify(reply), Message::Reply { id: 7, .. }));
        for other in [
            &br#"{"return": {}, "id": "x"}"#[..],
            b"[1]",
            b"3",
            b"{\"event\": 5}",
        ] {
            let v = parse_line(other).unwrap().unwrap();
            assert!(matches!(classify(v), Message::Other(_)), "{other:?}");
        }
    }

    #[test]
    fn reads_greetings_and_errors() {
        let g = parse_line(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(parse_greeting(&g).unwrap().version.qemu.major, 7);
        assert!(matches!(
            parse_greeting(&serde_json::json!({"QMP": 1})),
            Err(QmpError::Greeting { .. })
        ));
        let err = serde_json::json!({"error": {"class": "GenericError", "desc": "no"}, "id": 1});
        assert!(matches!(
            decode_reply::<qapi::qmp::device_del>(err),
            Err(QmpError::Qemu { desc, .. }) if desc == "no"
        ));
        let bad = serde_json::json!({"error": 3, "id": 1});
        assert!(matches!(
            decode_reply::<qapi::qmp::device_del>(bad),
            Err(QmpError::Decode { .. })
        ));
    }
}
