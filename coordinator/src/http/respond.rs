//! Running a request's choices and answering: whole, or as Server-Sent Events, with tool
//! calls read out of chat answers when tools are offered.

use std::convert::Infallible;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::generate::FinishReason;
use common::tokenizer::tools::{ToolStream, ToolSyntax};
use futures::Stream;
use serde_json::{json, Value};

use super::generation::{Choice, Choices};
use super::openai::{self, tools, Common, PromptTokensDetails, Usage};
use super::trace::RequestSpan;
use super::{now, ApiError, AppState, ServedModel};
use crate::cluster::Cluster;
use crate::engine::{self, GenEvent};
use crate::error::CoordError;

/// What the answers are: completions' text, or chat messages (with calls read out of them
/// in this syntax when tools are offered).
#[derive(Debug, Clone, Copy)]
pub(super) enum Answer {
    Text,
    Chat(Option<ToolSyntax>),
}

/// The finish reason of a choice: `tool_calls` when its answer holds calls.
fn finish_reason(finish: Option<FinishReason>, calls: bool) -> Option<&'static str> {
    match calls {
        true => Some("tool_calls"),
        false => finish.map(FinishReason::as_str),
    }
}

/// One streamed chunk of choice `index`: a piece of text (none in its last chunk) with its
/// `logprobs` (`null` unless asked for).
fn chunk(
    chat: bool,
    ids: (&str, &str),
    index: usize,
    text: Option<&str>,
    logprobs: Value,
    finish: Option<&str>,
) -> Value {
    let delta = text.map_or(json!({}), |t| json!({"role": "assistant", "content": t}));
    chunk_with(chat, ids, index, text, delta, logprobs, finish)
}

/// [`chunk`] with a chat `delta` of its own (tool calls).
fn chunk_with(
    chat: bool,
    (id, model): (&str, &str),
    index: usize,
    text: Option<&str>,
    delta: Value,
    logprobs: Value,
    f: Option<&str>,
) -> Value {
    if chat {
        json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
               "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": f}]})
    } else {
        json!({"id": id, "object": "text_completion", "created": now(), "model": model,
               "choices": [{"index": index, "text": text.unwrap_or(""), "logprobs": logprobs,
                            "finish_reason": f}]})
    }
}

/// How a response is sent: whole, or as Server-Sent Events (with a usage chunk at the end
/// when the client asked for one).
#[derive(Debug, Clone, Copy)]
pub(super) struct Streaming {
    on: bool,
    usage: bool,
}

impl Streaming {
    pub(super) fn of(c: &Common) -> Self {
        Streaming {
            on: c.stream,
            usage: c.include_usage(),
        }
    }
}

/// One event of one choice.
type Tagged = (usize, GenEvent);

/// What a finished choice holds (for a whole response).
#[derive(Default)]
struct Done {
    text: String,
    logprobs: Vec<(u32, common::sampling::TokenLogprobs)>,
    finish: Option<FinishReason>,
}

pub(super) async fn serve(
    st: &AppState,
    m: &ServedModel,
    cluster: Arc<Cluster>,
    Choices {
        choices,
        n: group,
        keep,
        shown_logprobs,
        prompt_tokens,
    }: Choices,
    stream: Streaming,
    answer: Answer,
    (id, trace): (String, &RequestSpan),
) -> Result<Response, ApiError> {
    let chat = matches!(answer, Answer::Chat(_));
    let syntax = match answer {
        Answer::Chat(s) => s,
        Answer::Text => None,
    };
    trace.request(&choices[0].req);
    let asked = shown_logprobs;
    let tok = m.tok.clone();
    let permit = st
        .admission
        .clone()
        .try_acquire_many_owned(choices.len() as u32)
        .map_err(|_| ApiError::from(CoordError::Busy("too many requests in flight".into())))?;
    let trace = trace.clone();
    let k = choices.len();
    let echoes: Vec<Option<String>> = choices.iter().map(|c| c.echo.clone()).collect();
    // One generation per choice, their events merged and tagged with the choice. The `n`
    // choices of a prompt share its prefill: one task runs the prompt once and forks its
    // session for the others.
    let (merged_tx, mut rx) = tokio::sync::mpsc::channel::<Tagged>(64);
    let mut choices = choices.into_iter().peekable();
    let mut first = true;
    while choices.peek().is_some() {
        let members: Vec<Choice> = choices.by_ref().take(group).collect();
        let t = trace.clone();
        let lead = std::mem::take(&mut first);
        let admitted = move || {
            if lead {
                t.admitted()
            }
        };
        let indices: Vec<usize> = members.iter().map(|c| c.index).collect();
        let streams = if members.len() > 1 && members[0].req.prompt.len() > 1 {
            engine::start_shared(
                m.serving.clone(),
                cluster.clone(),
                m.tok.clone(),
                members.into_iter().map(|c| c.req).collect(),
                trace.span.clone(),
                admitted,
            )
        } else {
            let mut admitted = Some(admitted);
            members
                .into_iter()
                .map(|c| {
                    let a = admitted.take();
                    engine::start(
                        m.serving.clone(),
                        cluster.clone(),
                        m.tok.clone(),
                        c.req,
                        trace.span.clone(),
                        move || a.into_iter().for_each(|a| a()),
                    )
                })
                .collect()
        };
        for (index, mut one) in indices.into_iter().zip(streams) {
            let tx = merged_tx.clone();
            tokio::spawn(async move {
                while let Some(ev) = one.recv().await {
                    if tx.send((index, ev)).await.is_err() {
                        return; // the response is gone: dropping `one` stops the generation
                    }
                }
            });
        }
    }
    drop(merged_tx);
    let model = m.id.clone();
    if stream.on {
        // With `include_usage`, every chunk carries `usage` (null but in the last).
        let with_usage = move |mut c: Value| {
            if stream.usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let s = async_stream(move |tx| async move {
            let _permit = permit;
            let mut offsets = vec![0usize; k];
            let mut calls: Vec<Option<ToolStream>> = vec![syntax.map(ToolStream::new); k];
            let (mut left, mut completion_tokens, mut cached_tokens) = (k, 0, 0);
            let send = |v: Value| Event::default().data(v.to_string());
            for (i, echo) in echoes.iter().enumerate() {
                if let Some(e) = echo {
                    offsets[i] = e.chars().count();
                    let c = with_usage(chunk(chat, (&id, &model), i, Some(e), Value::Null, None));
                    if tx.send(send(c)).await.is_err() {
                        return;
                    }
                }
            }
            while let Some((i, ev)) = rx.recv().await {
                let ev = match ev {
                    GenEvent::Piece(p) => {
                        trace.first_text();
                        let lp = openai::logprobs::field(
                            &tok,
                            chat,
                            asked,
                            &p.logprobs,
                            &mut offsets[i],
                        );
                        let shown = match &mut calls[i] {
                            Some(c) => c.push(&p.text),
                            None => p.text,
                        };
                        if shown.is_empty() && lp.is_null() {
                            continue; // held: it may be a tool call
                        }
                        send(with_usage(chunk(
                            chat,
                            (&id, &model),
                            i,
                            Some(&shown),
                            lp,
                            None,
                        )))
                    }
                    GenEvent::Done {
                        finish,
                        completion_tokens: generated,
                        cached_tokens: c,
                        ..
                    } => {
                        completion_tokens += generated;
                        cached_tokens = cached_tokens.max(c);
                        left -= 1;
                        // what was held back: the rest of the text, then each call
                        let mut end = Vec::new();
                        let mut called = false;
                        if let Some(c) = calls[i].take() {
                            let p = c.finish();
                            if !p.content.is_empty() {
                                end.push(chunk(
                                    chat,
                                    (&id, &model),
                                    i,
                                    Some(&p.content),
                                    Value::Null,
                                    None,
                                ));
                            }
                            for d in tools::deltas(&p, &id, i) {
                                end.push(chunk_with(
                                    chat,
                                    (&id, &model),
                                    i,
                                    None,
                                    d,
                                    Value::Null,
                                    None,
                                ));
                            }
                            called = !p.calls.is_empty();
                        }
                        let f = finish_reason(Some(finish), called);
                        end.push(chunk(chat, (&id, &model), i, None, Value::Null, f));
                        for c in end {
                            if tx.send(send(with_usage(c))).await.is_err() {
                                return;
                            }
                        }
                        if left > 0 {
                            continue;
                        }
                        trace.done(finish, prompt_tokens, completion_tokens);
                        if stream.usage {
                            let object = if chat {
                                "chat.completion.chunk"
                            } else {
                                "text_completion"
                            };
                            let usage = Usage {
                                prompt_tokens,
                                completion_tokens,
                                total_tokens: prompt_tokens + completion_tokens,
                                prompt_tokens_details: PromptTokensDetails { cached_tokens },
                            };
                            let last = json!({"id": id, "object": object, "created": now(),
                                "model": model, "choices": [], "usage": usage});
                            let _ = tx.send(send(last)).await;
                        }
                        let _ = tx.send(Event::default().data("[DONE]")).await;
                        return;
                    }
                    GenEvent::Error(e) => {
                        let ApiError(code, message, kind) = ApiError::from(e);
                        trace.failed(kind);
                        let body = json!({"error": {"message": message, "type": kind, "code": code.as_u16()}});
                        let _ = tx
                            .send(Event::default().event("error").data(body.to_string()))
                            .await;
                        return;
                    }
                };
                if tx.send(ev).await.is_err() {
                    return; // client gone: dropping `rx` stops the generations
                }
            }
        });
        return Ok(Sse::new(s).into_response());
    }
    let _permit = permit;
    let mut done: Vec<Done> = (0..k).map(|_| Done::default()).collect();
    let (mut left, mut completion_tokens, mut cached_tokens) = (k, 0, 0);
    while let Some((i, ev)) = rx.recv().await {
        match ev {
            GenEvent::Piece(p) => {
                trace.first_text();
                done[i].text.push_str(&p.text);
                done[i].logprobs.extend(p.logprobs);
            }
            GenEvent::Done {
                finish,
                completion_tokens: generated,
                cached_tokens: c,
                ..
            } => {
                done[i].finish = Some(finish);
                completion_tokens += generated;
                cached_tokens = cached_tokens.max(c);
                left -= 1;
                if left > 0 {
                    continue;
                }
                trace.done(finish, prompt_tokens, completion_tokens);
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                    prompt_tokens_details: PromptTokensDetails { cached_tokens },
                };
                let picked = best(&done, group, keep);
                let choices: Vec<Value> = picked
                    .into_iter()
                    .map(|c| (&done[c], &echoes[c]))
                    .enumerate()
                    .map(|(i, (d, echo))| {
                        let mut offset = echo.as_ref().map_or(0, |e| e.chars().count());
                        let lp =
                            openai::logprobs::field(&tok, chat, asked, &d.logprobs, &mut offset);
                        if chat {
                            let (message, called) = match syntax {
                                Some(s) => {
                                    let p = s.parse(&d.text);
                                    (tools::message(&p, &id, i), !p.calls.is_empty())
                                }
                                None => (json!({"role": "assistant", "content": d.text}), false),
                            };
                            let f = finish_reason(d.finish, called);
                            json!({"index": i, "message": message, "logprobs": lp, "finish_reason": f})
                        } else {
                            let f = d.finish.map(FinishReason::as_str);
                            let text = format!("{}{}", echo.as_deref().unwrap_or(""), d.text);
                            json!({"index": i, "text": text, "logprobs": lp, "finish_reason": f})
                        }
                    })
                    .collect();
                let obj = if chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Ok(Json(json!({"id": id, "object": obj, "created": now(),
                    "model": model, "choices": choices, "usage": usage}))
                .into_response());
            }
            GenEvent::Error(e) => {
                let e = ApiError::from(e);
                trace.failed(e.2);
                return Err(e);
            }
        }
    }
    Err(ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation ended without a result".into(),
        "server_error",
    ))
}

/// The choices answered, in order: all of them, or with `best_of` (`keep` below the group
/// size `n`) the `keep` of each prompt's `n` whose tokens are likeliest on average (OpenAI's
/// "highest log probability per token"), best first.
fn best(done: &[Done], n: usize, keep: usize) -> Vec<usize> {
    if keep >= n {
        return (0..done.len()).collect();
    }
    let score: Vec<f64> = done
        .iter()
        .map(|d| match d.logprobs.len() {
            0 => f64::NEG_INFINITY,
            k => {
                d.logprobs
                    .iter()
                    .map(|(_, l)| f64::from(l.logprob))
                    .sum::<f64>()
                    / k as f64
            }
        })
        .collect();
    let mut out = Vec::with_capacity(done.len() / n * keep);
    for start in (0..done.len()).step_by(n) {
        let mut group: Vec<usize> = (start..(start + n).min(done.len())).collect();
        group.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
        out.extend(group.into_iter().take(keep));
    }
    out
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |e| {
        let _ = &guard;
        Ok(e)
    })
}

/// Aborts the feeding task when the response stream is dropped (the client went away).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
