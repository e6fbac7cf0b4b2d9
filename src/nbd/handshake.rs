//! The fixed-newstyle handshake as a sans-IO state machine: feed it the
//! client's bytes, it appends the server's bytes to an output buffer and
//! says when transmission starts.

use super::error::ProtocolError;
use super::export::{ExportInfo, Exports};
use super::session::{BASE_ALLOCATION_ID, ReplyMode, Session};
use super::wire::*;

/// Option payloads longer than this are skipped, not buffered.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Whether a connection is offered TLS, and whether it must use it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS is refused by policy (the spec's NOTLS mode).
    #[default]
    Off,
    /// STARTTLS is accepted, and plaintext clients are served too.
    On,
    /// Nothing but STARTTLS and ABORT is served before TLS (FORCEDTLS).
    Require,
}

/// The largest READ or WRITE a server takes unless told otherwise: twice
/// the spec's 32 MiB, which nbdkit and nbd-server serve and which clients
/// that ignore the advertised maximum (qemu-img convert, nbdcopy) send.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// Limits and policy for one handshake.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeConfig {
    /// Options a client may send before we hang up (a denial-of-service guard).
    pub max_options: usize,
    /// Whether TLS is offered, required or off.
    pub tls: TlsMode,
    /// The largest READ, WRITE or CACHE the server takes, in bytes: every
    /// export's advertised maximum block size is capped by it.
    pub max_payload: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            max_options: 1024,
            tls: TlsMode::Off,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// What the caller should do after feeding input.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Send the output, then read more.
    NeedMore,
    /// Send the output, then switch to transmission with this session.
    Transmission(Session),
    /// Send the output, then close: the client aborted.
    Close,
    /// Send the output as it is (it ends with the STARTTLS ACK), then run
    /// TLS on the connection: every later byte either way goes through it,
    /// and `feed` takes the decrypted input. Bytes after the consumed ones
    /// are the client's first TLS records.
    StartTls,
}

#[derive(Clone, Copy, Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { opt: u32, len: usize },
    Skip { opt: u32, remaining: u64 },
    Finished,
}

/// Server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    cfg: HandshakeConfig,
    state: State,
    no_zeroes: bool,
    /// The client set NBD_FLAG_C_FIXED_NEWSTYLE; without it TLS is off.
    fixed: bool,
    /// STARTTLS succeeded: the input is what TLS decrypted.
    tls: bool,
    mode: ReplyMode,
    /// Export id for which `base:allocation` was selected.
    meta: Option<usize>,
    options: usize,
}

enum Outcome {
    Continue,
    Go(Session),
    Abort,
    StartTls,
}

impl Handshake {
    /// Starts a handshake, appending the server greeting to `out`.
    pub fn new(cfg: HandshakeConfig, out: &mut Vec<u8>) -> Self {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            cfg,
            state: State::ClientFlags,
            no_zeroes: false,
            fixed: false,
            tls: false,
            mode: ReplyMode::Simple,
            meta: None,
            options: 0,
        }
    }

    /// Consumes as much of `input` as forms complete messages, appending
    /// replies to `out`. Returns the bytes consumed; bytes after a
    /// `Transmission` belong to the transmission phase.
    pub fn feed(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Progress), ProtocolError> {
        let mut pos = 0;
        loop {
            let avail = &input[pos..];
            match self.state {
                State::Finished => return Ok((pos, Progress::NeedMore)),
                State::ClientFlags => {
                    let Some(flags) = be_u32(avail, 0) else {
                        return Ok((pos, Progress::NeedMore));
                    };
                    pos += 4;
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(ProtocolError::BadClientFlags(flags));
                    }
                    // Kept across STARTTLS: the flags are no option state.
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
                    if !self.fixed && self.cfg.tls == TlsMode::Require {
                        // Such a client is owed NOTLS mode, which would serve it in plaintext.
                        return Err(ProtocolError::TlsNeedsFixedNewstyle);
                    }
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let (Some(magic), Some(opt), Some(len)) =
                        (be_u64(avail, 0), be_u32(avail, 8), be_u32(avail, 12))
                    else {
                        return Ok((pos, Progress::NeedMore));
                    };
                    pos += 16;
                    if magic != IHAVEOPT {
                        return Err(ProtocolError::BadOptionMagic(magic));
                    }
                    self.options += 1;
                    if self.options > self.cfg.max_options {
                        return Err(ProtocolError::TooManyOptions(self.cfg.max_options));
                    }
                    self.state = if len > MAX_OPTION_DATA {
                        if opt == OPT_EXPORT_NAME {
                            return Err(ProtocolError::ExportNameTooLong(len.into()));
                        }
                        State::Skip {
                            opt,
                            remaining: len.into(),
                        }
                    } else {
                        State::OptionData {
                            opt,
                            len: len as usize,
                        }
                    };
                }
                State::OptionData { opt, len } => {
                    if avail.len() < len {
                        return Ok((pos, Progress::NeedMore));
                    }
                    pos += len;
                    self.state = State::OptionHeader;
                    match self.option(opt, &avail[..len], exports, out)? {
                        Outcome::Continue => {}
                        Outcome::Go(session) => {
                            self.state = State::Finished;
                            return Ok((pos, Progress::Transmission(session)));
                        }
                        Outcome::Abort => {
                            self.state = State::Finished;
                            return Ok((pos, Progress::Close));
                        }
                        Outcome::StartTls => return Ok((pos, Progress::StartTls)),
                    }
                }
                State::Skip { opt, remaining } => {
                    let take = remaining.min(avail.len() as u64);
                    pos += take as usize;
                    let remaining = remaining - take;
                    if remaining > 0 {
                        self.state = State::Skip { opt, remaining };
                        return Ok((pos, Progress::NeedMore));
                    }
                    if self.tls_required() {
                        rep_err(out, opt, REP_ERR_TLS_REQD, TLS_REQD);
                    } else {
                        rep_err(out, opt, REP_ERR_TOO_BIG, "option data is too long");
                    }
                    self.state = State::OptionHeader;
                }
            }
        }
    }

    fn option(
        &mut self,
        opt: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<Outcome, ProtocolError> {
        if self.tls_required() && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                // It cannot be answered with an error, so the spec says hang up.
                return Err(ProtocolError::TlsRequired);
            }
            rep_err(out, opt, REP_ERR_TLS_REQD, TLS_REQD);
            return Ok(Outcome::Continue);
        }
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some(info) = exports.lookup(&name) else {
                    return Err(ProtocolError::UnknownExport(name.into_owned()));
                };
                let session = self.session(info);
                out.extend_from_slice(&session.export.size.to_be_bytes());
                out.extend_from_slice(&session.flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(Outcome::Go(session))
            }
            OPT_ABORT => {
                rep(out, opt, REP_ACK, &[]);
                Ok(Outcome::Abort)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    rep_err(out, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(Outcome::Continue);
                }
                for (name, description) in exports.list() {
                    let len = (name.len() as u32).to_be_bytes();
                    rep(
                        out,
                        opt,
                        REP_SERVER,
                        &[&len, name.as_bytes(), description.as_bytes()],
                    );
                }
                rep(out, opt, REP_ACK, &[]);
                Ok(Outcome::Continue)
            }
            OPT_STARTTLS => {
                let (typ, msg) = if !data.is_empty() {
                    (REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                } else if self.tls {
                    (REP_ERR_INVALID, "TLS is already running")
                } else if self.cfg.tls == TlsMode::Off {
                    (REP_ERR_POLICY, "TLS is not enabled on this server")
                } else if !self.fixed {
                    (
                        REP_ERR_POLICY,
                        "TLS needs fixed newstyle negotiation (NBD_FLAG_C_FIXED_NEWSTYLE)",
                    )
                } else {
                    (REP_ACK, "")
                };
                rep_maybe_err(out, opt, typ, msg);
                if typ != REP_ACK {
                    return Ok(Outcome::Continue);
                }
                // Nothing negotiated in plaintext survives: a man in the
                // middle could have sent it (CVE-2021-3716 in nbdkit).
                self.tls = true;
                self.mode = ReplyMode::Simple;
                self.meta = None;
                Ok(Outcome::StartTls)
            }
            OPT_INFO | OPT_GO => self.info_or_go(opt, data, exports, out),
            OPT_STRUCTURED_REPLY => {
                let (typ, msg) = if !data.is_empty() {
                    (REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                } else if self.mode == ReplyMode::Extended {
                    (
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )
                } else if self.mode == ReplyMode::Structured {
                    (REP_ERR_INVALID, "structured replies are already negotiated")
                } else {
                    self.mode = ReplyMode::Structured;
                    (REP_ACK, "")
                };
                rep_maybe_err(out, opt, typ, msg);
                Ok(Outcome::Continue)
            }
            OPT_EXTENDED_HEADERS => {
                let (typ, msg) = if !data.is_empty() {
                    (REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
                } else if self.mode == ReplyMode::Extended {
                    (REP_ERR_INVALID, "extended headers are already negotiated")
                } else {
                    self.mode = ReplyMode::Extended;
                    (REP_ACK, "")
                };
                rep_maybe_err(out, opt, typ, msg);
                Ok(Outcome::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data, exports, out);
                Ok(Outcome::Continue)
            }
            _ => {
                rep_err(
                    out,
                    opt,
                    REP_ERR_UNSUP,
                    "option not supported by this server",
                );
                Ok(Outcome::Continue)
            }
        }
    }

    fn info_or_go(
        &mut self,
        opt: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<Outcome, ProtocolError> {
        let mut r = Reader(data);
        let parsed = (|| {
            let name = r.string()?;
            let n = r.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            r.0.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            rep_err(
                out,
                opt,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
            return Ok(Outcome::Continue);
        };
        let Some(info) = exports.lookup(name) else {
            rep_err(out, opt, REP_ERR_UNKNOWN, "no export of that name");
            return Ok(Outcome::Continue);
        };
        let session = self.session(info);
        let e = &session.export;
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&e.size.to_be_bytes());
        export.extend_from_slice(&session.flags.to_be_bytes());
        rep(out, opt, REP_INFO, &[&export]);
        if requests.contains(&INFO_NAME) {
            rep(
                out,
                opt,
                REP_INFO,
                &[&INFO_NAME.to_be_bytes(), e.name.as_bytes()],
            );
        }
        if requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let d = &INFO_DESCRIPTION.to_be_bytes();
            rep(out, opt, REP_INFO, &[d, e.description.as_bytes()]);
        }
        // Always sent: clients that did not ask must ignore it, and it costs
        // nothing; with a minimum of 1 no client is held to stricter rules.
        let mut bs = Vec::with_capacity(14);
        bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&e.block.minimum.to_be_bytes());
        bs.extend_from_slice(&e.block.preferred.to_be_bytes());
        bs.extend_from_slice(&e.block.maximum.to_be_bytes());
        rep(out, opt, REP_INFO, &[&bs]);
        rep(out, opt, REP_ACK, &[]);
        Ok(if opt == OPT_GO {
            Outcome::Go(session)
        } else {
            Outcome::Continue
        })
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta = None;
        }
        if self.mode == ReplyMode::Simple {
            rep_err(
                out,
                opt,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let mut r = Reader(data);
        let parsed = (|| {
            let name = r.string()?;
            let n = r.u32()?;
            let mut matched = false;
            let mut wildcard = false;
            for _ in 0..n {
                let q = r.string()?;
                matched |= q == BASE_ALLOCATION;
                wildcard |= q == "base:";
            }
            r.0.is_empty().then_some((name, n, matched, wildcard))
        })();
        let Some((name, n, matched, wildcard)) = parsed else {
            rep_err(out, opt, REP_ERR_INVALID, "malformed meta context request");
            return;
        };
        let Some(info) = exports.lookup(name) else {
            rep_err(out, opt, REP_ERR_UNKNOWN, "no export of that name");
            return;
        };
        let selected = if set {
            matched
        } else {
            n == 0 || matched || wildcard
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            rep(
                out,
                opt,
                REP_META_CONTEXT,
                &[&id.to_be_bytes(), BASE_ALLOCATION.as_bytes()],
            );
            if set {
                self.meta = Some(info.id);
            }
        }
        rep(out, opt, REP_ACK, &[]);
    }

    /// Whether options other than STARTTLS and ABORT must be refused now.
    fn tls_required(&self) -> bool {
        self.cfg.tls == TlsMode::Require && !self.tls
    }

    fn session(&self, mut export: ExportInfo) -> Session {
        // The server's limit caps the export's own; never below the
        // preferred size, which the spec requires the maximum to cover.
        let block = &mut export.block;
        block.maximum = block.maximum.min(self.cfg.max_payload).max(block.preferred);
        let mut flags = export.flags | FLAG_HAS_FLAGS;
        if self.mode != ReplyMode::Simple {
            flags |= FLAG_SEND_DF;
        }
        let base_allocation = (self.mode != ReplyMode::Simple && self.meta == Some(export.id))
            .then_some(BASE_ALLOCATION_ID);
        Session {
            export,
            flags,
            mode: self.mode,
            base_allocation,
        }
    }
}

const TLS_REQD: &str = "this server requires TLS: send NBD_OPT_STARTTLS first";

fn rep(out: &mut Vec<u8>, opt: u32, typ: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

fn rep_err(out: &mut Vec<u8>, opt: u32, typ: u32, msg: &str) {
    rep(out, opt, typ, &[msg.as_bytes()]);
}

fn rep_maybe_err(out: &mut Vec<u8>, opt: u32, typ: u32, msg: &str) {
    if typ == REP_ACK {
        rep(out, opt, typ, &[]);
    } else {
        rep_err(out, opt, typ, msg);
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Bounds-checked reader over option data.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    /// A length-prefixed string, valid UTF-8 and within the spec's limit.
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
}

#[cfg(test)]
mod tests {
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
}
