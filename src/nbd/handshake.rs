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
mod tests;
