//! A session's outbox on the last stage: the outcome of a step sent with
//! [`proto_types::ReplyRoute::Collect`] waits here for the `collect` call that takes it, so
//! that the coordinator hears of its token one hop away instead of through every stage.
//!
//! A session has at most one step in flight, so the outbox holds at most one outcome (a
//! token, never logits) and at most one waiter. Both go with the session.

use proto_types::{ErrorCode, ForwardOutput, ReplyKey, ShardError};
use tokio::sync::oneshot;

/// A step's outcome.
pub type Outcome = Result<ForwardOutput, ShardError>;

/// Which step an outcome answers: its start, and the key the session's owner sent with it (an
/// outcome of a step someone else slipped in carries another key, and answers nobody).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The step's first position.
    pub start: u32,
    /// The key of `ReplyRoute::Collect`.
    pub key: ReplyKey,
}

/// What the outbox holds.
#[derive(Debug, Default)]
pub struct Outbox {
    /// An outcome nobody has asked for yet.
    ready: Option<(Ticket, Outcome)>,
    /// A `collect` waiting for its step.
    waiter: Option<(Ticket, oneshot::Sender<Outcome>)>,
    /// The last outcome handed over.
    taken: Option<Ticket>,
}

impl Outbox {
    /// Leaves the outcome of the step of `ticket`: to the waiter for it, if one waits, else
    /// for the next `collect` (replacing any outcome left earlier and never taken).
    pub fn deliver(&mut self, ticket: Ticket, outcome: Outcome) {
        let outcome = match self.waiter.take() {
            Some((want, tx)) if want == ticket => match tx.send(outcome) {
                Ok(()) => {
                    self.taken = Some(ticket);
                    return;
                }
                // The waiter went away (its call was cancelled): keep it for a retry.
                Err(outcome) => outcome,
            },
            other => {
                self.waiter = other;
                outcome
            }
        };
        self.ready = Some((ticket, outcome));
    }

    /// The outcome of the step of `ticket`: at once if it is here, else a receiver that gets
    /// it when it comes (and an error if the session goes first). A waiter for another step
    /// is told it was superseded: its caller has moved on.
    pub fn take(&mut self, ticket: Ticket) -> Result<Outcome, oneshot::Receiver<Outcome>> {
        if matches!(self.ready, Some((t, _)) if t == ticket) {
            if let Some((_, outcome)) = self.ready.take() {
                self.taken = Some(ticket);
                return Ok(outcome);
            }
        }
        if self.taken == Some(ticket) {
            return Ok(Err(ShardError::new(
                ErrorCode::InvalidArgument,
                format!("the step at {} was collected already", ticket.start),
            )));
        }
        // An older step's outcome nobody collected: its caller has moved on.
        if matches!(self.ready, Some((t, _)) if t.start < ticket.start) {
            self.ready = None;
        }
        if let Some((old, tx)) = self.waiter.take() {
            let _ = tx.send(Err(ShardError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "the collect of the step at {} was superseded by one for the step at {}",
                    old.start, ticket.start
                ),
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.waiter = Some((ticket, tx));
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

    fn at(start: u32) -> Ticket {
        Ticket {
            start,
            key: ReplyKey(77),
        }
    }

    #[test]
    fn an_outcome_left_before_the_collect_is_taken_once() {
        let mut b = Outbox::default();
        b.deliver(at(4), out(7));
        assert_eq!(token(b.take(at(4)).expect("ready")), 7);
        // taken: asking again is an error, not a wait that never ends
        assert!(b.take(at(4)).expect("answered").is_err());
        // the next step's collect waits
        assert!(b.take(at(5)).is_err());
    }

    #[tokio::test]
    async fn a_waiting_collect_gets_its_step_and_no_other() {
        let mut b = Outbox::default();
        let rx = b.take(at(5)).expect_err("nothing yet");
        // an outcome of another step does not answer it
        b.deliver(at(4), out(1));
        b.deliver(at(5), out(9));
        assert_eq!(token(rx.await.expect("sent")), 9);
    }

    #[tokio::test]
    async fn a_step_slipped_in_with_another_key_answers_nobody() {
        let mut b = Outbox::default();
        let rx = b.take(at(3)).expect_err("nothing yet");
        let forged = Ticket {
            start: 3,
            key: ReplyKey(1),
        };
        b.deliver(forged, out(666));
        // still waiting: the owner's own step, refused at its position, fails it instead
        b.deliver(at(3), out(5));
        assert_eq!(token(rx.await.expect("sent")), 5);
        // and a forged outcome left beforehand is not handed over either
        b.deliver(
            Ticket {
                start: 4,
                key: ReplyKey(1),
            },
            out(666),
        );
        assert!(b.take(at(4)).is_err(), "waits for its own");
    }

    #[test]
    fn a_collect_with_another_key_leaves_the_outcome_to_its_owner() {
        let mut b = Outbox::default();
        b.deliver(at(6), out(3));
        let stranger = Ticket {
            start: 6,
            key: ReplyKey(2),
        };
        assert!(b.take(stranger).is_err(), "waits, gets nothing");
        assert_eq!(token(b.take(at(6)).expect("still there")), 3);
    }

    #[tokio::test]
    async fn a_cancelled_collect_leaves_the_outcome_for_a_retry() {
        let mut b = Outbox::default();
        drop(b.take(at(3)).expect_err("nothing yet"));
        b.deliver(at(3), out(2));
        assert_eq!(token(b.take(at(3)).expect("kept")), 2);
    }

    #[tokio::test]
    async fn a_superseded_collect_is_told_so() {
        let mut b = Outbox::default();
        let first = b.take(at(3)).expect_err("nothing yet");
        let _second = b.take(at(4)).expect_err("nothing yet");
        let told = first.await.expect("answered");
        assert!(told.expect_err("superseded").detail.contains("superseded"));
    }

    #[tokio::test]
    async fn a_waiter_hears_when_the_session_goes() {
        let mut b = Outbox::default();
        let rx = b.take(at(0)).expect_err("nothing yet");
        drop(b);
        assert!(rx.await.is_err());
    }
}
