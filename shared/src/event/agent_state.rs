//! [`AgentState`]: the agent state strings of OpenHands (`openhands/core/schema/agent.py`).

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The state of the agent loop, as carried in `change_agent_state` actions and
/// `agent_state_changed` observations.
///
/// Open-ended: stored data may hold values this list does not know (old trajectories contain
/// `init`), so unknown strings are kept in [`AgentState::Other`] and written back unchanged.
/// On the wire it is the plain string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// `loading`: the session is (re)initialising.
    Loading,
    /// `running`: the agent is stepping.
    Running,
    /// `awaiting_user_input`: idle, waiting for a user message.
    AwaitingUserInput,
    /// `paused`: paused by the user or by loop recovery.
    Paused,
    /// `stopped`: stopped by the user or because the session closed.
    Stopped,
    /// `finished`: the agent called `finish`.
    Finished,
    /// `rejected`: the agent called `reject`.
    Rejected,
    /// `error`: failure; the observation's `extras.reason` holds the text.
    Error,
    /// `awaiting_user_confirmation`: an action waits for approval.
    AwaitingUserConfirmation,
    /// `user_confirmed`: the client approved a pending action (transient).
    UserConfirmed,
    /// `user_rejected`: the client rejected a pending action (transient).
    UserRejected,
    /// `rate_limited`: the LLM is rate limited; retrying.
    RateLimited,
    /// Any other string (e.g. the legacy `init`), kept verbatim.
    Other(String),
}

impl AgentState {
    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Loading => "loading",
            Self::Running => "running",
            Self::AwaitingUserInput => "awaiting_user_input",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Finished => "finished",
            Self::Rejected => "rejected",
            Self::Error => "error",
            Self::AwaitingUserConfirmation => "awaiting_user_confirmation",
            Self::UserConfirmed => "user_confirmed",
            Self::UserRejected => "user_rejected",
            Self::RateLimited => "rate_limited",
            Self::Other(s) => s,
        }
    }

    /// Maps a wire string to a state; never fails (unknown strings become [`AgentState::Other`]).
    pub fn from_wire(s: &str) -> Self {
        match s {
            "loading" => Self::Loading,
            "running" => Self::Running,
            "awaiting_user_input" => Self::AwaitingUserInput,
            "paused" => Self::Paused,
            "stopped" => Self::Stopped,
            "finished" => Self::Finished,
            "rejected" => Self::Rejected,
            "error" => Self::Error,
            "awaiting_user_confirmation" => Self::AwaitingUserConfirmation,
            "user_confirmed" => Self::UserConfirmed,
            "user_rejected" => Self::UserRejected,
            "rate_limited" => Self::RateLimited,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl FromStr for AgentState {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(Self::from_wire(s))
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for AgentState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AgentState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(Self::from_wire(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::AgentState;

    #[test]
    fn known_and_unknown_states_round_trip_as_plain_strings() {
        for s in [
            "loading",
            "running",
            "awaiting_user_input",
            "paused",
            "stopped",
            "finished",
            "rejected",
            "error",
            "awaiting_user_confirmation",
            "user_confirmed",
            "user_rejected",
            "rate_limited",
            "init",
        ] {
            let state: AgentState = s.parse().unwrap();
            assert_eq!(state.as_str(), s);
            assert_eq!(serde_json::to_value(&state).unwrap(), s);
            let back: AgentState = serde_json::from_value(s.into()).unwrap();
            assert_eq!(back, state);
        }
        assert_eq!(
            AgentState::from_wire("init"),
            AgentState::Other("init".into())
        );
        assert_eq!(
            AgentState::from_wire("awaiting_user_input"),
            AgentState::AwaitingUserInput
        );
    }
}
