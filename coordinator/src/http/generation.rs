//! The completion and chat handlers: a request checked into a [`GenRequest`], run by the
//! engine, answered whole or as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use common::generate::FinishReason;
use common::tokenizer::tools::{ToolStream, ToolSyntax};
use futures::Stream;
use serde_json::{json, Value};

use super::openai::{self, *};
use super::trace::RequestSpan;
use super::{bad, now, ApiError, AppState};
use crate::cluster::Cluster;
use crate::engine::{self, GenEvent, GenRequest};
use crate::error::CoordError;

/// The shared fields once checked (`checked`): non-OpenAI fields logged, `logit_bias` ids
/// checked against the vocabulary.
fn with_vocab(st: &AppState, c: &Common, checked: Checked) -> Result<Checked, ApiError> {
    let ignored = c.ignored_fields();
    if !ignored.is_empty() {
        tracing::info!(fields = ?ignored, "ignoring request fields that are not OpenAI's");
    }
    let vocab = st.tok.vocab_size();
    if let Some((id, _)) = checked
        .sampling
        .logit_bias
        .iter()
        .find(|(i, _)| *i as usize >= vocab)
    {
        return Err(bad(format!(
            "token id {id} in `logit_bias` is outside the vocabulary of {vocab}"
        )));
    }
    Ok(checked)
}

/// One prompt's generation under `checked`: the prompt tokenized (or its ids checked) and
/// fitted to the context.
fn gen_request(
    st: &AppState,
    cluster: &Cluster,
    prompt: &OnePrompt,
    checked: &Checked,
    ignore_eos: bool,
) -> Result<GenRequest, ApiError> {
    let max_tokens = checked.max_tokens;
    let vocab = st.tok.vocab_size();
    let ids = match prompt {
        // The tokenizer failing is the coordinator's problem, not the request's.
        OnePrompt::Text(t) => st.tok.encode(t).map_err(CoordError::from)?,
        OnePrompt::Ids(ids) => {
            if let Some(bad_id) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(bad(format!(
                    "token id {bad_id} in `prompt` is outside the vocabulary of {vocab}"
                )));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    if ids.len() + max_tokens > cluster.max_ctx {
        return Err(bad(format!(
            "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the context of {} tokens",
            ids.len(),
            cluster.max_ctx
        )));
    }
    Ok(GenRequest {
        prompt: ids,
        max_tokens,
        sampling: checked.sampling.clone(),
        stop: checked.stop.clone(),
        ignore_eos,
        grammar: checked.grammar.clone(),
    })
}

/// Most choices one request may ask for (prompts times `n`).
pub const MAX_CHOICES: usize = 16;

/// One choice of a response: its index, its generation, and the text echoed before it.
struct Choice {
    index: usize,
    req: GenRequest,
    echo: Option<String>,
}

/// A response's choices, `n` per prompt in a row, and its prompt tokens (each prompt once,
/// however many choices it has, as OpenAI counts them).
struct Choices {
    choices: Vec<Choice>,
    n: usize,
    prompt_tokens: usize,
}

/// The choices of `reqs` (one per prompt) times `n`, indexed prompt by prompt as OpenAI does;
/// choice `c` of a prompt samples with `seed + c`, so a seeded request is reproducible and
/// its choices differ.
fn fan_out(reqs: Vec<(GenRequest, Option<String>)>, n: usize) -> Result<Choices, ApiError> {
    if reqs.len() * n > MAX_CHOICES {
        return Err(bad(format!(
            "{} prompts times `n` = {n} asks for {} choices; at most {MAX_CHOICES}",
            reqs.len(),
            reqs.len() * n
        )));
    }
    let mut out = Vec::with_capacity(reqs.len() * n);
    let prompt_tokens = reqs.iter().map(|(r, _)| r.prompt.len()).sum();
    for (req, echo) in reqs {
        for c in 0..n {
            let mut req = req.clone();
            req.sampling.seed = req.sampling.seed.wrapping_add(c as u64);
            out.push(Choice {
                index: out.len(),
                req,
                echo: echo.clone(),
            });
        }
    }
    Ok(Choices {
        choices: out,
        n,
        prompt_tokens,
    })
}

pub(super) async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let (id, trace) = st.open_trace(&headers, false);
    let run = async {
        let cluster = st.serving.current()?;
        let n = req.common.n().map_err(bad)?;
        let checked = req.common.checked(Endpoint::Completion).map_err(bad)?;
        let checked = with_vocab(&st, &req.common, checked)?;
        let asked = checked.sampling.logprobs.is_some();
        let reqs = {
            let _s = trace.step("tokenize");
            let mut reqs = Vec::new();
            for prompt in req.prompt.all().map_err(bad)? {
                let echo = req.echo_text(&prompt, &st.tok, asked).map_err(bad)?;
                let prompt = match &req.suffix {
                    Some(suffix) if !suffix.is_empty() => fill_in_the_middle(&st, &prompt, suffix)?,
                    _ => prompt,
                };
                let g = gen_request(&st, &cluster, &prompt, &checked, req.common.ignore_eos)?;
                reqs.push((g, echo));
            }
            reqs
        };
        if let Some(grammar) = &checked.grammar {
            st.check_grammar(grammar).await?;
        }
        let stream = Streaming::of(&req.common);
        serve(
            &st,
            cluster,
            fan_out(reqs, n)?,
            stream,
            Answer::Text,
            id,
            &trace,
        )
        .await
    };
    run.await.inspect_err(|e| trace.failed(e.2))
}

/// The prompt in prefix-suffix-middle order with the model's fill-in-the-middle tokens, as
/// ids; a model without them: 400.
fn fill_in_the_middle(
    st: &AppState,
    prompt: &OnePrompt,
    suffix: &str,
) -> Result<OnePrompt, ApiError> {
    let Some((pre, suf, mid)) = st.tok.fim_tokens() else {
        return Err(bad(
            "`suffix` needs a model with fill-in-the-middle tokens; this one has none",
        ));
    };
    let enc = |t: &str| st.tok.encode_with(t, false).map_err(CoordError::from);
    let prefix = match prompt {
        OnePrompt::Text(t) => enc(t)?,
        OnePrompt::Ids(ids) => ids.clone(),
    };
    let mut ids = vec![pre];
    ids.extend(prefix);
    ids.push(suf);
    ids.extend(enc(suffix)?);
    ids.push(mid);
    Ok(OnePrompt::Ids(ids))
}

pub(super) async fn chat(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    let (id, trace) = st.open_trace(&headers, true);
    let run = async {
        let cluster = st.serving.current()?;
        let mut checked = with_vocab(&st, &req.common, req.checked().map_err(bad)?)?;
        let n = req.common.n().map_err(bad)?;
        let template = st
            .tok
            .chat_template()
            .ok_or_else(|| bad("the model has no chat template; use /v1/completions"))?;
        // tools shown to the model, and the syntax its calls are read in
        let tools = req.tools().map_err(bad)?.filter(Tools::active);
        let syntax = match &tools {
            Some(t) => {
                let syntax = template.tool_syntax().map_err(bad)?;
                if let Some(g) = t.grammar(syntax) {
                    checked.grammar = Some(common::grammar::Grammar::Lark(g));
                }
                Some(syntax)
            }
            None => None,
        };
        let g = {
            let _s = trace.step("chat template and tokenize");
            let messages = req.chat_messages().map_err(bad)?;
            let prompt = template
                .render_with_tools(&messages, tools.as_ref().map(|t| &t.list), true)
                .map_err(|e| bad(e.to_string()))?;
            let prompt = OnePrompt::Text(prompt);
            gen_request(&st, &cluster, &prompt, &checked, req.common.ignore_eos)?
        };
        if let Some(grammar) = &checked.grammar {
            st.check_grammar(grammar).await?;
        }
        let stream = Streaming::of(&req.common);
        serve(
            &st,
            cluster,
            fan_out(vec![(g, None)], n)?,
            stream,
            Answer::Chat(syntax),
            id,
            &trace,
        )
        .await
    };
    run.await.inspect_err(|e| trace.failed(e.2))
}

/// What the answers are: completions' text, or chat messages (with calls read out of them
/// in this syntax when tools are offered).
#[derive(Debug, Clone, Copy)]
enum Answer {
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
struct Streaming {
    on: bool,
    usage: bool,
}

impl Streaming {
    fn of(c: &Common) -> Self {
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

async fn serve(
    st: &AppState,
    cluster: Arc<Cluster>,
    Choices {
        choices,
        n,
        prompt_tokens,
    }: Choices,
    stream: Streaming,
    answer: Answer,
    id: String,
    trace: &RequestSpan,
) -> Result<Response, ApiError> {
    let chat = matches!(answer, Answer::Chat(_));
    let syntax = match answer {
        Answer::Chat(s) => s,
        Answer::Text => None,
    };
    trace.request(&choices[0].req);
    let asked = choices[0].req.sampling.logprobs.is_some();
    let tok = st.tok.clone();
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
        let group: Vec<Choice> = choices.by_ref().take(n).collect();
        let t = trace.clone();
        let lead = std::mem::take(&mut first);
        let admitted = move || {
            if lead {
                t.admitted()
            }
        };
        let indices: Vec<usize> = group.iter().map(|c| c.index).collect();
        let streams = if group.len() > 1 && group[0].req.prompt.len() > 1 {
            engine::start_shared(
                st.serving.clone(),
                cluster.clone(),
                st.tok.clone(),
                group.into_iter().map(|c| c.req).collect(),
                trace.span.clone(),
                admitted,
            )
        } else {
            let mut admitted = Some(admitted);
            group
                .into_iter()
                .map(|c| {
                    let a = admitted.take();
                    engine::start(
                        st.serving.clone(),
                        cluster.clone(),
                        st.tok.clone(),
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
    let model = st.model_id.clone();
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
            let (mut left, mut completion_tokens) = (k, 0);
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
                        completion_tokens: n,
                        ..
                    } => {
                        completion_tokens += n;
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
    let (mut left, mut completion_tokens) = (k, 0);
    while let Some((i, ev)) = rx.recv().await {
        match ev {
            GenEvent::Piece(p) => {
                trace.first_text();
                done[i].text.push_str(&p.text);
                done[i].logprobs.extend(p.logprobs);
            }
            GenEvent::Done {
                finish,
                completion_tokens: n,
                ..
            } => {
                done[i].finish = Some(finish);
                completion_tokens += n;
                left -= 1;
                if left > 0 {
                    continue;
                }
                trace.done(finish, prompt_tokens, completion_tokens);
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                let choices: Vec<Value> = done
                    .iter()
                    .zip(&echoes)
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
