//! A session's outbox on the last stage: the outcome of a step sent with
//! [`proto_types::ReplyRoute::Collect`] waits here for the `collect` call that takes it, so
//! that the coordinator hears of its token one hop away instead of through every stage.
//!
//! A session has at most one step in flight, so the outbox holds at most one outcome (a
//! token, never logits) and at most one waiter. Both go with the session.

use proto_types::{ForwardOutput, ShardError};
use tokio::sync::oneshot;

/// A step's outcome.
pub type Outcome = Result<ForwardOutput, ShardError>;

/// What the outbox holds.
#[derive(Debug, Default)]
pub struct Outbox {
    /// An outcome nobody has asked for yet, with its step's start.
    ready: Option<(u32, Outcome)>,
    /// A `collect` waiting for the step at its start.
    waiter: Option<(u32, oneshot::Sender<Outcome>)>,
    /// The start of the last step delivered (positions only grow).
    delivered: Option<u32>,
}

impl Outbox {
    /// Leaves the outcome of the step at `start`: to the waiter for it, if one waits, else
    /// for the next `collect` (replacing any outcome left earlier and never taken).
    pub fn deliver(&mut self, start: u32, outcome: Outcome) {
        self.delivered = Some(start);
        let outcome = match self.waiter.take() {
            Some((want, tx)) if want == start => match tx.send(outcome) {
                Ok(()) => return,
                // The waiter went away (its call was cancelled): keep it for a retry.
                Err(outcome) => outcome,
            },
            other => {
                self.waiter = other;
                outcome
            }
        };
        self.ready = Some((start, outcome));
    }

    /// The outcome of the step at `start`: at once if it is here, else a receiver that gets
    /// it when it comes (and an error if the session goes first). A waiter for another step
    /// is replaced: its caller has moved on.
    pub fn take(&mut self, start: u32) -> Result<Outcome, oneshot::Receiver<Outcome>> {
        if matches!(self.ready, Some((at, _)) if at == start) {
            if let Some((_, outcome)) = self.ready.take() {
                return Ok(outcome);
            }
        }
        if let Some(at) = self.delivered.filter(|&at| at >= start) {
            return Ok(Err(ShardError::new(
                proto_types::ErrorCode::InvalidArgument,
                format!("the step at {start} was collected already (the session's last step started at {at})"),
            )));
        }
        // An older step's outcome nobody collected: its caller has moved on.
        self.ready = None;
        let (tx, rx) = oneshot::channel();
        self.waiter = Some((start, tx));
        Err(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto_types::SessionId;

    fn out(token: u32) -> Outcome {
        Ok(ForwardOutput {
            session: SessionId(1),
            pick: Some(proto_types::WirePick {
                token,
                logprobs: None,
            }),
            logits: None,
        })
    }

    fn token(o: Outcome) -> u32 {
        o.expect("ok").pick.expect("pick").token
    }

    #[test]
    fn an_outcome_left_before_the_collect_is_taken_once() {
        let mut b = Outbox::default();
        b.deliver(4, out(7));
        assert_eq!(token(b.take(4).expect("ready")), 7);
        // taken: asking again is an error, not a wait that never ends
        assert!(b.take(4).expect("answered").is_err());
        // the next step's collect waits
        assert!(b.take(5).is_err());
    }

    #[tokio::test]
    async fn a_waiting_collect_gets_its_step_and_no_other() {
        let mut b = Outbox::default();
        let rx = b.take(5).expect_err("nothing yet");
        // an outcome of another step does not answer it
        b.deliver(4, out(1));
        b.deliver(5, out(9));
        assert_eq!(token(rx.await.expect("sent")), 9);
    }

    #[tokio::test]
    async fn a_cancelled_collect_leaves_the_outcome_for_a_retry() {
        let mut b = Outbox::default();
        drop(b.take(3).expect_err("nothing yet"));
        b.deliver(3, out(2));
        assert_eq!(token(b.take(3).expect("kept")), 2);
    }

    #[tokio::test]
    async fn a_waiter_hears_when_the_session_goes() {
        let mut b = Outbox::default();
        let rx = b.take(0).expect_err("nothing yet");
        drop(b);
        assert!(rx.await.is_err());
    }

    #[test]
    fn asking_for_a_step_already_passed_is_an_error() {
        let mut b = Outbox::default();
        b.deliver(10, out(1));
        assert!(b.take(3).expect("answered").is_err());
    }
}
