use super::*;
use crate::nbd::client::{go_data, meta_data, option as opt};
use crate::nbd::export::BlockSizes;

struct One;
impl Exports for One {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name.is_empty() || name == "disk").then(|| ExportInfo {
            id: 3,
            name: "disk".into(),
            description: "a disk".into(),
            size: 1 << 30,
            flags: FLAG_SEND_FLUSH,
            block: BlockSizes::default(),
        })
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "a disk".into())]
    }
}

fn start() -> (Handshake, Vec<u8>) {
    let mut out = Vec::new();
    let mut hs = Handshake::new(HandshakeConfig::default(), &mut out);
    assert_eq!(
        out,
        [
            &b"NBDMAGICIHAVEOPT"[..],
            &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
        ]
        .concat()
    );
    out.clear();
    let r = hs.feed(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes(), &One, &mut out);
    assert_eq!(r, Ok((4, Progress::NeedMore)));
    (hs, out)
}

/// Splits option replies into (option, type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert_eq!(be_u64(out, 0), Some(REPLY_MAGIC));
        let len = be_u32(out, 16).unwrap() as usize;
        v.push((
            be_u32(out, 8).unwrap(),
            be_u32(out, 12).unwrap(),
            out[20..20 + len].to_vec(),
        ));
        out = &out[20 + len..];
    }
    v
}

#[test]
fn export_name_sends_size_flags_and_zeroes() {
    let (mut hs, mut out) = start();
    let (n, p) = hs
        .feed(&opt(OPT_EXPORT_NAME, b"disk"), &One, &mut out)
        .unwrap();
    assert_eq!(n, 20);
    let Progress::Transmission(s) = p else {
        panic!("{p:?}")
    };
    assert_eq!(s.mode, ReplyMode::Simple);
    assert_eq!(s.flags, FLAG_SEND_FLUSH | FLAG_HAS_FLAGS);
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(be_u64(&out, 0), Some(1 << 30));
    assert!(out[10..].iter().all(|&b| b == 0));
}

#[test]
fn partial_input_is_not_consumed() {
    let (mut hs, mut out) = start();
    let msg = opt(OPT_LIST, &[]);
    for cut in 0..msg.len() {
        assert_eq!(
            hs.feed(&msg[..cut], &One, &mut out),
            Ok((0, Progress::NeedMore))
        );
    }
    assert_eq!(hs.feed(&msg, &One, &mut out), Ok((16, Progress::NeedMore)));
    let r = replies(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2[4..8], b"disk");
    assert_eq!(r[1], (OPT_LIST, REP_ACK, vec![]));
}

#[test]
fn go_with_structured_replies_and_meta_context() {
    let (mut hs, mut out) = start();
    let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
    let meta = meta_data("disk", &["base:allocation"]);
    input.extend(opt(OPT_SET_META_CONTEXT, &meta));
    input.extend(opt(OPT_GO, &go_data("", &[INFO_NAME])));
    let (n, p) = hs.feed(&input, &One, &mut out).unwrap();
    assert_eq!(n, input.len());
    let Progress::Transmission(s) = p else {
        panic!("{p:?}")
    };
    assert_eq!(s.mode, ReplyMode::Structured);
    assert_eq!(s.base_allocation, Some(BASE_ALLOCATION_ID));
    assert_ne!(s.flags & FLAG_SEND_DF, 0);
    let r = replies(&out);
    let types: Vec<u32> = r.iter().map(|x| x.1).collect();
    // ACK; META_CONTEXT, ACK; INFO export, INFO name, INFO block size, ACK.
    assert_eq!(
        types,
        [
            REP_ACK,
            REP_META_CONTEXT,
            REP_ACK,
            REP_INFO,
            REP_INFO,
            REP_INFO,
            REP_ACK
        ]
    );
    assert_eq!(
        r[1].2,
        [&BASE_ALLOCATION_ID.to_be_bytes()[..], b"base:allocation"].concat()
    );
    assert_eq!(r[4].2, [&INFO_NAME.to_be_bytes()[..], b"disk"].concat());
}

/// An export whose volume sets no maximum of its own.
struct Unlimited;
impl Exports for Unlimited {
    fn lookup(&self, _: &str) -> Option<ExportInfo> {
        let mut e = One.lookup("disk")?;
        e.block = BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: u32::MAX,
        };
        Some(e)
    }
    fn list(&self) -> Vec<(String, String)> {
        One.list()
    }
}

#[test]
fn the_server_limit_caps_the_advertised_maximum() {
    let block_size = |max_payload: u32, exports: &dyn Exports| {
        let mut out = Vec::new();
        let cfg = HandshakeConfig {
            max_payload,
            ..HandshakeConfig::default()
        };
        let mut hs = Handshake::new(cfg, &mut out);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(opt(OPT_GO, &[0, 0, 0, 0, 0, 0]));
        out.clear();
        let (_, p) = hs.feed(&input, exports, &mut out).unwrap();
        let Progress::Transmission(s) = p else {
            panic!("{p:?}")
        };
        let info = replies(&out)
            .into_iter()
            .find(|r| r.1 == REP_INFO && r.2[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("NBD_INFO_BLOCK_SIZE");
        let max = be_u32(&info.2, 10).unwrap();
        assert_eq!(max, s.export.block.maximum, "advertised = enforced");
        (
            be_u32(&info.2, 2).unwrap(),
            be_u32(&info.2, 6).unwrap(),
            max,
        )
    };
    assert_eq!(block_size(64 << 20, &Unlimited), (512, 4096, 64 << 20));
    assert_eq!(block_size(8 << 20, &Unlimited), (512, 4096, 8 << 20));
    // An export's own, smaller maximum stays.
    assert_eq!(block_size(64 << 20, &One), (1, 4096, 32 << 20));
}

#[test]
fn meta_context_for_another_export_is_not_kept() {
    let (mut hs, mut out) = start();
    hs.feed(&opt(OPT_STRUCTURED_REPLY, &[]), &One, &mut out)
        .unwrap();
    let meta = meta_data("missing", &[]);
    out.clear();
    hs.feed(&opt(OPT_SET_META_CONTEXT, &meta), &One, &mut out)
        .unwrap();
    assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
    let (_, p) = hs.feed(&opt(OPT_EXPORT_NAME, b""), &One, &mut out).unwrap();
    let Progress::Transmission(s) = p else {
        panic!()
    };
    assert_eq!(s.base_allocation, None);
}

#[test]
fn refusals() {
    let (mut hs, mut out) = start();
    for (o, data, want) in [
        (OPT_STARTTLS, &b""[..], REP_ERR_POLICY),
        (OPT_STARTTLS, b"x", REP_ERR_INVALID),
        (OPT_LIST, b"x", REP_ERR_INVALID),
        (OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID),
        (OPT_INFO, b"\0\0\0\x05ab", REP_ERR_INVALID),
        (OPT_SET_META_CONTEXT, b"\0\0\0\0\0\0\0\0", REP_ERR_INVALID),
        (42, b"whatever", REP_ERR_UNSUP),
    ] {
        out.clear();
        hs.feed(&opt(o, data), &One, &mut out).unwrap();
        let r = replies(&out);
        assert_eq!(
            (r.len(), r[0].0, r[0].1),
            (1, o, want),
            "option {o} {data:?}"
        );
        assert!(!r[0].2.is_empty(), "errors carry a message");
    }
}

#[test]
fn hard_failures() {
    let mut out = Vec::new();
    let mut hs = Handshake::new(HandshakeConfig::default(), &mut out);
    assert_eq!(
        hs.feed(&4u32.to_be_bytes(), &One, &mut out),
        Err(ProtocolError::BadClientFlags(4))
    );
    let (mut hs, mut out) = start();
    assert!(matches!(
        hs.feed(&[0u8; 16], &One, &mut out),
        Err(ProtocolError::BadOptionMagic(0))
    ));
    let (mut hs, mut out) = start();
    assert!(matches!(
        hs.feed(&opt(OPT_EXPORT_NAME, b"nope"), &One, &mut out),
        Err(ProtocolError::UnknownExport(_))
    ));
    let mut out = Vec::new();
    let cfg = HandshakeConfig {
        max_options: 2,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(cfg, &mut out);
    let mut input = 0u32.to_be_bytes().to_vec();
    for _ in 0..3 {
        input.extend(opt(99, &[]));
    }
    assert_eq!(
        hs.feed(&input, &One, &mut out),
        Err(ProtocolError::TooManyOptions(2))
    );
}

/// A handshake under `tls` past client flags `flags`.
fn start_tls_mode(tls: TlsMode, flags: u32) -> (Handshake, Vec<u8>) {
    let mut out = Vec::new();
    let cfg = HandshakeConfig {
        tls,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(cfg, &mut out);
    out.clear();
    assert_eq!(
        hs.feed(&flags.to_be_bytes(), &One, &mut out),
        Ok((4, Progress::NeedMore))
    );
    (hs, out)
}

#[test]
fn require_refuses_all_but_starttls_and_abort() {
    let (mut hs, mut out) = start_tls_mode(TlsMode::Require, FLAG_C_FIXED_NEWSTYLE);
    for (o, data) in [
        (OPT_LIST, vec![]),
        (OPT_INFO, go_data("disk", &[])),
        (OPT_GO, go_data("disk", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (OPT_LIST_META_CONTEXT, vec![0; 8]),
        (42, b"whatever".to_vec()),
    ] {
        out.clear();
        assert_eq!(
            hs.feed(&opt(o, &data), &One, &mut out),
            Ok((16 + data.len(), Progress::NeedMore))
        );
        let r = replies(&out);
        assert_eq!((r.len(), r[0].0, r[0].1), (1, o, REP_ERR_TLS_REQD), "{o}");
        assert!(!r[0].2.is_empty(), "errors carry a message");
    }
    // An oversized option is skipped and refused the same way.
    out.clear();
    let big = opt(OPT_LIST, &vec![0; MAX_OPTION_DATA as usize + 1]);
    hs.feed(&big, &One, &mut out).unwrap();
    assert_eq!(replies(&out)[0].1, REP_ERR_TLS_REQD);
    // EXPORT_NAME cannot carry an error: the connection ends.
    let (mut hs2, mut out2) = start_tls_mode(TlsMode::Require, FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(
        hs2.feed(&opt(OPT_EXPORT_NAME, b"disk"), &One, &mut out2),
        Err(ProtocolError::TlsRequired)
    );
    // ABORT is still answered.
    out.clear();
    assert_eq!(
        hs.feed(&opt(OPT_ABORT, &[]), &One, &mut out),
        Ok((16, Progress::Close))
    );
    assert_eq!(replies(&out), [(OPT_ABORT, REP_ACK, vec![])]);
}

#[test]
fn starttls_switches_and_the_handshake_goes_on_inside() {
    let (mut hs, mut out) = start_tls_mode(TlsMode::Require, FLAG_C_FIXED_NEWSTYLE);
    // Bytes after STARTTLS are TLS records: not consumed.
    let mut input = opt(OPT_STARTTLS, &[]);
    input.extend_from_slice(b"\x16\x03\x01 client hello");
    assert_eq!(
        hs.feed(&input, &One, &mut out),
        Ok((16, Progress::StartTls))
    );
    assert_eq!(replies(&out), [(OPT_STARTTLS, REP_ACK, vec![])]);
    // Now the options are served, and a second STARTTLS is invalid.
    out.clear();
    hs.feed(&opt(OPT_LIST, &[]), &One, &mut out).unwrap();
    assert_eq!(replies(&out).last().map(|r| r.1), Some(REP_ACK));
    out.clear();
    hs.feed(&opt(OPT_STARTTLS, &[]), &One, &mut out).unwrap();
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    assert_go_attaches(&mut hs, &mut out);
}

#[test]
fn starttls_forgets_plaintext_negotiation() {
    let (mut hs, mut out) = start_tls_mode(TlsMode::On, FLAG_C_FIXED_NEWSTYLE);
    let meta = meta_data("disk", &["base:allocation"]);
    let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
    input.extend(opt(OPT_SET_META_CONTEXT, &meta));
    input.extend(opt(OPT_STARTTLS, &[]));
    let (_, p) = hs.feed(&input, &One, &mut out).unwrap();
    assert_eq!(p, Progress::StartTls);
    // Without renegotiating, the session is simple with no context.
    let (_, p) = hs
        .feed(&opt(OPT_GO, &go_data("", &[])), &One, &mut out)
        .unwrap();
    let Progress::Transmission(s) = p else {
        panic!("{p:?}")
    };
    assert_eq!((s.mode, s.base_allocation), (ReplyMode::Simple, None));
    assert_eq!(s.flags & FLAG_SEND_DF, 0);
}

/// GO on `disk` succeeds, with no TLS_REQD among the replies.
fn assert_go_attaches(hs: &mut Handshake, out: &mut Vec<u8>) {
    out.clear();
    let (_, p) = hs
        .feed(&opt(OPT_GO, &go_data("disk", &[])), &One, out)
        .unwrap();
    assert!(matches!(p, Progress::Transmission(_)), "{p:?}");
    assert!(replies(out).iter().all(|r| r.1 != REP_ERR_TLS_REQD));
}

#[test]
fn optional_tls_serves_plaintext_too() {
    let (mut hs, mut out) = start_tls_mode(TlsMode::On, FLAG_C_FIXED_NEWSTYLE);
    assert_go_attaches(&mut hs, &mut out);
}

#[test]
fn no_zeroes_is_kept_across_starttls() {
    for (flags, len) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        (FLAG_C_FIXED_NEWSTYLE, 134),
    ] {
        let (mut hs, mut out) = start_tls_mode(TlsMode::Require, flags);
        hs.feed(&opt(OPT_STARTTLS, &[]), &One, &mut out).unwrap();
        out.clear();
        let (_, p) = hs
            .feed(&opt(OPT_EXPORT_NAME, b"disk"), &One, &mut out)
            .unwrap();
        assert!(matches!(p, Progress::Transmission(_)));
        assert_eq!(out.len(), len, "client flags {flags:#x}");
    }
}

#[test]
fn tls_needs_fixed_newstyle() {
    let (mut hs, mut out) = start_tls_mode(TlsMode::On, 0);
    hs.feed(&opt(OPT_STARTTLS, &[]), &One, &mut out).unwrap();
    assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
    let mut out = Vec::new();
    let cfg = HandshakeConfig {
        tls: TlsMode::Require,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(cfg, &mut out);
    assert_eq!(
        hs.feed(&FLAG_C_NO_ZEROES.to_be_bytes(), &One, &mut out),
        Err(ProtocolError::TlsNeedsFixedNewstyle)
    );
}

#[test]
fn starttls_with_data_is_invalid_in_every_mode() {
    for tls in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
        let (mut hs, mut out) = start_tls_mode(tls, FLAG_C_FIXED_NEWSTYLE);
        assert_eq!(
            hs.feed(&opt(OPT_STARTTLS, b"x"), &One, &mut out),
            Ok((17, Progress::NeedMore))
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "{tls:?}");
    }
}

#[test]
fn oversized_option_is_skipped_in_pieces() {
    let (mut hs, mut out) = start();
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&OPT_LIST.to_be_bytes());
    hdr.extend_from_slice(&(MAX_OPTION_DATA + 10).to_be_bytes());
    assert_eq!(hs.feed(&hdr, &One, &mut out), Ok((16, Progress::NeedMore)));
    let chunk = vec![0u8; 50_000];
    assert_eq!(
        hs.feed(&chunk, &One, &mut out),
        Ok((50_000, Progress::NeedMore))
    );
    assert!(out.is_empty());
    let rest = (MAX_OPTION_DATA + 10 - 50_000) as usize;
    let mut tail = vec![0u8; rest];
    tail.extend(opt(OPT_ABORT, &[]));
    assert_eq!(
        hs.feed(&tail, &One, &mut out),
        Ok((tail.len(), Progress::Close))
    );
    let r = replies(&out);
    assert_eq!(r[0].1, REP_ERR_TOO_BIG);
    assert_eq!(r[1], (OPT_ABORT, REP_ACK, vec![]));
}
