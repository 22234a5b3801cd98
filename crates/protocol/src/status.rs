//! Application status: what a service answers when a call fails for a
//! reason of its own (bad input, not found, not a member...). Codes are
//! gRPC's, so a status travels unchanged as an iroh error frame or a gRPC
//! status.

use std::fmt;

use bytes::Bytes;
use prost::Message;

use crate::pb;

/// Longest status message kept; longer messages are cut so that an error
/// frame stays small whatever a service put in it.
pub const MAX_STATUS_MESSAGE: usize = 4096;

/// gRPC status codes (without `Ok`: a status is always a failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    /// The operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// An error with no better code.
    Unknown = 2,
    /// The request is invalid whatever the system's state (bad VM spec...).
    InvalidArgument = 3,
    /// The deadline passed before the operation completed.
    DeadlineExceeded = 4,
    /// The named entity does not exist.
    NotFound = 5,
    /// The entity to create already exists.
    AlreadyExists = 6,
    /// The caller is known but not allowed (not a cluster member...).
    PermissionDenied = 7,
    /// A limit was hit: payload too large, too many calls in flight.
    ResourceExhausted = 8,
    /// The system is not in a state that allows the operation (not leader...).
    FailedPrecondition = 9,
    /// The operation was aborted (a conflict).
    Aborted = 10,
    /// A value is out of range.
    OutOfRange = 11,
    /// No such service or method.
    Unimplemented = 12,
    /// A bug or broken invariant on the serving side.
    Internal = 13,
    /// The service cannot serve now; retrying later may succeed.
    Unavailable = 14,
    /// Unrecoverable data loss.
    DataLoss = 15,
    /// The caller's identity could not be established.
    Unauthenticated = 16,
}

impl Code {
    /// The code with this number; unknown numbers become [`Code::Unknown`].
    pub fn from_u32(value: u32) -> Code {
        use Code::*;
        [
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ]
        .into_iter()
        .find(|c| *c as u32 == value)
        .unwrap_or(Unknown)
    }
}

/// A failed call's application status: a code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Status {
    /// What kind of failure.
    pub code: Code,
    /// What happened and, where possible, what to do next.
    pub message: String,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl Status {
    /// A status with this code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        let mut message = message.into();
        if message.len() > MAX_STATUS_MESSAGE {
            let mut cut = MAX_STATUS_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Status { code, message }
    }

    /// `InvalidArgument`.
    pub fn invalid_argument(message: impl Into<String>) -> Status {
        Status::new(Code::InvalidArgument, message)
    }

    /// `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Status {
        Status::new(Code::NotFound, message)
    }

    /// `Unimplemented`.
    pub fn unimplemented(message: impl Into<String>) -> Status {
        Status::new(Code::Unimplemented, message)
    }

    /// `PermissionDenied`.
    pub fn permission_denied(message: impl Into<String>) -> Status {
        Status::new(Code::PermissionDenied, message)
    }

    /// `Internal`.
    pub fn internal(message: impl Into<String>) -> Status {
        Status::new(Code::Internal, message)
    }

    /// `Unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Status {
        Status::new(Code::Unavailable, message)
    }

    /// Encodes the status as the payload of an error frame.
    pub fn encode(&self) -> Bytes {
        pb::RpcStatus {
            code: self.code as u32,
            message: self.message.clone(),
        }
        .encode_to_vec()
        .into()
    }

    /// Decodes an error frame's payload. A payload that is not a status is
    /// itself reported as an `Internal` status naming the problem.
    pub fn decode(payload: &[u8]) -> Status {
        match pb::RpcStatus::decode(payload) {
            Ok(s) => Status::new(Code::from_u32(s.code), s.message),
            Err(e) => Status::internal(format!("peer sent an undecodable error status: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_and_limits() {
        let s = Status::not_found("vm web-1 does not exist");
        assert_eq!(Status::decode(&s.encode()), s);
        let long = Status::internal("é".repeat(MAX_STATUS_MESSAGE));
        assert!(long.message.len() <= MAX_STATUS_MESSAGE);
        assert_eq!(Status::decode(&[0xff, 0xff]).code, Code::Internal);
        assert_eq!(Code::from_u32(999), Code::Unknown);
        for n in 1..=16 {
            assert_eq!(Code::from_u32(n) as u32, n);
        }
    }
}
