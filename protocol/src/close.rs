//! WebSocket close codes.
//!
//! The 4400–4499 band means "permanent: do not reconnect" (the y/hub convention, with
//! Hocuspocus's mnemonics); 1011, 1012 and 1013 are transient and clients retry them.

/// A close code the engine sends, with the retry rule clients apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Normal closure.
    pub const NORMAL: Self = Self(1000);
    /// The endpoint is going away (idle timeout on our side).
    pub const GOING_AWAY: Self = Self(1001);
    /// The frame does not follow the y-sync protocol (malformed message, text frame, trailing bytes).
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// A message type this server does not accept.
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// A well-formed message whose payload (a Yjs update, awareness JSON) is invalid.
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// A frame above the configured frame limit.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// Internal error; transient.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// The server is restarting or shutting down; transient.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// Overloaded or the client fell too far behind; transient.
    pub const TRY_AGAIN_LATER: Self = Self(1013);
    /// Not authenticated, or the token expired; permanent until the client has a new token.
    pub const UNAUTHENTICATED: Self = Self(4401);
    /// Authenticated but not allowed; permanent.
    pub const FORBIDDEN: Self = Self(4403);
    /// The document was deleted; permanent.
    pub const DOCUMENT_DELETED: Self = Self(4404);
    /// The document or an update exceeds a configured size limit; permanent.
    pub const TOO_LARGE: Self = Self(4413);

    /// Whether a client should give up instead of reconnecting.
    pub fn is_permanent(self) -> bool {
        (4400..4500).contains(&self.0)
    }

    /// Whether a client should reconnect (with backoff).
    pub fn is_transient(self) -> bool {
        matches!(self.0, 1001 | 1006 | 1011 | 1012 | 1013) || (4500..4600).contains(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands() {
        assert!(CloseCode::FORBIDDEN.is_permanent());
        assert!(CloseCode::TOO_LARGE.is_permanent());
        assert!(!CloseCode::SERVICE_RESTART.is_permanent());
        assert!(CloseCode::SERVICE_RESTART.is_transient());
        assert!(CloseCode::TRY_AGAIN_LATER.is_transient());
        assert!(!CloseCode::PROTOCOL_ERROR.is_transient());
        assert!(!CloseCode::UNAUTHENTICATED.is_transient());
    }
}
