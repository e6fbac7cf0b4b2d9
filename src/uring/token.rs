//! io_uring user data: which per-core object a completion belongs to.
//!
//! Layout: kind (8 bits) | index (24) | slot (16) | generation (16). The
//! kind says which table of the core the index points into and what
//! finished; the generation catches completions for an index that was
//! reused since. Objects the core hosts for other transports (a virtqueue
//! next to NBD connections) share one kind, [`Kind::Hosted`], and pick
//! their own slots (see [`super::Hosted`]).

/// What a completion is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A multishot accept on listener `index`.
    Accept = 1,
    /// The core's own eventfd read: messages or remote completions wait.
    Wake = 2,
    /// A receive on connection `index`.
    Recv = 3,
    /// A send on connection `index`.
    Send = 4,
    /// Volume I/O for request `slot` of object `index`.
    Io = 5,
    /// An `AsyncCancel` finished.
    Cancel = 6,
    /// The core's periodic timer.
    Timer = 7,
    /// Anything for slot `slot` of hosted object `index`.
    Hosted = 8,
}

/// A decoded token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// What finished.
    pub kind: Kind,
    /// Which object of its kind (a listener, a connection).
    pub index: usize,
    /// Which request of that object.
    pub slot: u16,
    /// The object's generation when the operation was queued.
    pub generation: u16,
}

/// Largest index a token can carry.
pub const MAX_INDEX: usize = (1 << 24) - 1;

impl Token {
    /// Packs into io_uring user data.
    #[inline]
    pub fn encode(kind: Kind, index: usize, slot: u16, generation: u16) -> u64 {
        ((kind as u64) << 56)
            | (((index & MAX_INDEX) as u64) << 32)
            | (u64::from(slot) << 16)
            | u64::from(generation)
    }

    /// Unpacks user data; `None` for values this crate never produced.
    #[inline]
    pub fn decode(v: u64) -> Option<Token> {
        let kind = match v >> 56 {
            1 => Kind::Accept,
            2 => Kind::Wake,
            3 => Kind::Recv,
            4 => Kind::Send,
            5 => Kind::Io,
            6 => Kind::Cancel,
            7 => Kind::Timer,
            8 => Kind::Hosted,
            _ => return None,
        };
        Some(Token {
            kind,
            index: ((v >> 32) & MAX_INDEX as u64) as usize,
            slot: (v >> 16) as u16,
            generation: v as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let v = Token::encode(Kind::Io, 123_456, 511, 65_535);
        assert_eq!(
            Token::decode(v),
            Some(Token {
                kind: Kind::Io,
                index: 123_456,
                slot: 511,
                generation: 65_535
            })
        );
        assert_eq!(Token::decode(0), None);
    }
}
