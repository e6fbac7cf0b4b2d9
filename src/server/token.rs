//! io_uring user data: which core object a completion belongs to.
//!
//! Layout: kind (8 bits) | connection index (24) | slot (16) | generation (16).
//! The generation catches completions for a connection slot that was reused.

/// What a completion is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Accept = 1,
    Wake = 2,
    Recv = 3,
    Send = 4,
    Io = 5,
    Cancel = 6,
    Timer = 7,
}

/// A decoded token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub conn: usize,
    pub slot: u16,
    pub generation: u16,
}

/// Largest connection index a token can carry.
pub const MAX_CONNS: usize = (1 << 24) - 1;

impl Token {
    /// Packs into io_uring user data.
    pub fn encode(kind: Kind, conn: usize, slot: u16, generation: u16) -> u64 {
        ((kind as u64) << 56)
            | (((conn & MAX_CONNS) as u64) << 32)
            | (u64::from(slot) << 16)
            | u64::from(generation)
    }

    /// Unpacks user data; `None` for values this server never produced.
    pub fn decode(v: u64) -> Option<Token> {
        let kind = match v >> 56 {
            1 => Kind::Accept,
            2 => Kind::Wake,
            3 => Kind::Recv,
            4 => Kind::Send,
            5 => Kind::Io,
            6 => Kind::Cancel,
            7 => Kind::Timer,
            _ => return None,
        };
        Some(Token {
            kind,
            conn: ((v >> 32) & MAX_CONNS as u64) as usize,
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
                conn: 123_456,
                slot: 511,
                generation: 65_535
            })
        );
        assert_eq!(Token::decode(0), None);
    }
}
