//! The engine thread end to end, on the tiny fixture model.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::infer::GenerateOptions;
use crate::model::fixture::{write_fixture, FixtureSpec};

const TEXT: &str = "The keeper counted the boats in the harbour every evening, and wrote the number in a \
    small book. Some nights the wind came from the sea and the boats knocked together like wooden bells; \
    other nights the water lay still and the lamps on the pier shone in it.\n";

fn fixture_dir(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("qs-jobs-{tag}-"))
        .tempdir()
        .expect("tempdir");
    let model = dir.path().join("tiny-llama");
    write_fixture(&FixtureSpec::tiny_llama(), &model).expect("fixture");
    (dir, model)
}

/// Every event of `job` up to and including its last one (panics after `timeout`).
fn collect(engine: &EngineHandle, job: JobId, timeout: Duration) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = engine
            .events
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("job {job} did not end in {timeout:?}; got {out:?}"));
        if ev.job() != job {
            continue;
        }
        let end = ev.is_terminal();
        out.push(ev);
        if end {
            return out;
        }
    }
}

fn submit(engine: &EngineHandle, c: Command) -> JobId {
    engine.submit(c).expect("engine").expect("a job")
}

#[test]
fn inspect_bad_path_fails_with_the_path_in_the_message() {
    let engine = EngineHandle::spawn();
    let job = submit(
        &engine,
        Command::Inspect {
            path: PathBuf::from("/nonexistent/model-folder"),
        },
    );
    let evs = collect(&engine, job, Duration::from_secs(10));
    assert!(
        matches!(
            evs[0],
            Event::Started {
                kind: JobKind::Inspect,
                ..
            }
        ),
        "{evs:?}"
    );
    match evs.last() {
        Some(Event::Failed { error, .. }) => {
            assert!(error.contains("/nonexistent/model-folder"), "{error}");
            assert!(!error.contains('\n'));
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    engine.shutdown();
}

#[test]
fn commands_sent_raw_get_ids_in_order_and_a_waker_is_called() {
    let (_dir, model) = fixture_dir("raw");
    let engine = EngineHandle::spawn();
    let woken = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&woken);
    engine.set_waker(Box::new(move || {
        w.fetch_add(1, Ordering::Relaxed);
    }));
    engine
        .commands
        .send(Command::Inspect {
            path: model.clone(),
        })
        .expect("send");
    let first = engine
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("event");
    let Event::Started { job, kind } = first else {
        panic!("expected Started, got {first:?}");
    };
    assert_eq!(kind, JobKind::Inspect);
    let evs = collect(&engine, job, Duration::from_secs(30));
    assert!(
        matches!(
            evs.last(),
            Some(Event::Finished {
                output: JobOutput::Summary(_),
                ..
            })
        ),
        "{evs:?}"
    );
    // A submitted job gets a different id.
    let job2 = submit(&engine, Command::Inspect { path: model });
    assert_ne!(job, job2);
    collect(&engine, job2, Duration::from_secs(30));
    // The waker runs just after each event is sent, so the last wake may trail the last event a little.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while woken.load(Ordering::Relaxed) < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(woken.load(Ordering::Relaxed) >= 4);
    engine.shutdown();
}

#[test]
fn evaluation_events_arrive_in_order() {
    let (_dir, model) = fixture_dir("eval");
    let engine = EngineHandle::spawn();
    let options = EvalOptions {
        n_ctx: 32,
        max_chunks: Some(3),
        ..EvalOptions::default()
    };
    let job = submit(
        &engine,
        Command::Evaluate {
            model: model.clone(),
            base: None,
            text: EvalText::Inline(TEXT.repeat(4)),
            options,
        },
    );
    let evs = collect(&engine, job, Duration::from_secs(60));
    assert!(
        matches!(
            evs[0],
            Event::Started {
                kind: JobKind::Evaluate,
                ..
            }
        ),
        "{evs:?}"
    );
    let chunks: Vec<&ChunkProgress> = evs
        .iter()
        .filter_map(|e| match e {
            Event::EvalChunk { progress, .. } => Some(progress),
            _ => None,
        })
        .collect();
    assert_eq!(
        chunks.iter().map(|c| c.chunk).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // Loading progress comes before the first chunk.
    let first_chunk = evs
        .iter()
        .position(|e| matches!(e, Event::EvalChunk { .. }))
        .expect("chunk");
    assert!(evs[..first_chunk]
        .iter()
        .any(|e| matches!(e, Event::Progress { .. })));
    let Some(Event::Finished {
        output: JobOutput::Perplexity(r),
        ..
    }) = evs.last()
    else {
        panic!("expected a perplexity, got {:?}", evs.last());
    };
    assert_eq!(r.n_chunks, 3);
    assert!(r.ppl.is_finite() && r.ppl > 1.0);
    assert_eq!(
        r.chunk_ppl,
        chunks.iter().map(|c| c.ppl).collect::<Vec<_>>()
    );

    // KL-divergence of the model from itself, reusing the cached model.
    let job = submit(
        &engine,
        Command::Evaluate {
            model: model.clone(),
            base: Some(model),
            text: EvalText::Inline(TEXT.repeat(4)),
            options,
        },
    );
    let evs = collect(&engine, job, Duration::from_secs(60));
    let Some(Event::Finished {
        output: JobOutput::Kld(k),
        ..
    }) = evs.last()
    else {
        panic!("expected a KLD report, got {:?}", evs.last());
    };
    assert!(k.full_precision.kld.mean.value.abs() < 1e-6);
    assert!((k.stats.ppl.value - r.ppl).abs() < 1e-4 * r.ppl);
    engine.shutdown();
}

#[test]
fn a_job_is_cancelled_within_a_second() {
    let (_dir, model) = fixture_dir("cancel");
    let engine = EngineHandle::spawn();
    // Many small chunks: far more work than a second.
    let job = submit(
        &engine,
        Command::Evaluate {
            model,
            base: None,
            text: EvalText::Inline(TEXT.repeat(2000)),
            options: EvalOptions {
                n_ctx: 16,
                max_chunks: None,
                ..EvalOptions::default()
            },
        },
    );
    // Wait for the first chunk, then cancel.
    loop {
        let ev = engine
            .events
            .recv_timeout(Duration::from_secs(60))
            .expect("event");
        assert!(!ev.is_terminal(), "ended early: {ev:?}");
        if matches!(ev, Event::EvalChunk { .. }) {
            break;
        }
    }
    let t0 = Instant::now();
    engine.submit(Command::Cancel(job)).expect("engine");
    let evs = collect(&engine, job, Duration::from_secs(5));
    let took = t0.elapsed();
    assert!(
        matches!(evs.last(), Some(Event::Cancelled { .. })),
        "{:?}",
        evs.last()
    );
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
    engine.shutdown();
}

#[test]
fn generation_streams_tokens_and_can_be_cancelled() {
    let (_dir, model) = fixture_dir("gen");
    let engine = EngineHandle::spawn();
    let options = GenerateOptions {
        max_new_tokens: 5,
        ..GenerateOptions::default()
    };
    let job = submit(
        &engine,
        Command::Generate {
            model: model.clone(),
            prompt: "The keeper".into(),
            options: options.clone(),
            apply_chat_template: false,
        },
    );
    let evs = collect(&engine, job, Duration::from_secs(60));
    let streamed: String = evs
        .iter()
        .filter_map(|e| match e {
            Event::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    match evs.last() {
        Some(Event::Finished {
            output: JobOutput::Generated { text, stats },
            ..
        }) => {
            assert_eq!(*text, streamed);
            assert!(stats.generated_tokens <= 5);
        }
        other => panic!("expected Generated, got {other:?}"),
    }

    // A long generation, cancelled after its first token.
    let job = submit(
        &engine,
        Command::Generate {
            model,
            prompt: "The keeper".into(),
            options: GenerateOptions {
                max_new_tokens: 1_000_000,
                stop_strings: Vec::new(),
                allow_long_context: false,
                backend: crate::backend::Backend::Cpu,
                numerics: crate::infer::Numerics::LlamaCpu,
                sampler: crate::infer::SamplerConfig {
                    temperature: 1.0,
                    seed: 7,
                    ..Default::default()
                },
                draft: None,
                draft_tokens: crate::infer::DEFAULT_DRAFT_TOKENS,
                draft_p_min: crate::infer::DEFAULT_DRAFT_P_MIN,
                draft_numerics: None,
            },
            apply_chat_template: true,
        },
    );
    let mut first_token = false;
    while !first_token {
        let ev = engine
            .events
            .recv_timeout(Duration::from_secs(60))
            .expect("event");
        if ev.is_terminal() {
            // Sampling ended (end of text) before we could cancel: nothing to test here.
            return;
        }
        first_token = matches!(ev, Event::Token { .. });
    }
    let t0 = Instant::now();
    engine.submit(Command::Cancel(job)).expect("engine");
    let evs = collect(&engine, job, Duration::from_secs(5));
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(
            evs.last(),
            Some(Event::Cancelled { .. } | Event::Finished { .. })
        ),
        "{:?}",
        evs.last()
    );
    engine.shutdown();
}

#[test]
fn generation_with_a_draft_reports_its_acceptance() {
    let (_dir, model) = fixture_dir("gen-draft");
    let (_other_dir, other) = fixture_dir("gen-draft-other");
    let engine = EngineHandle::spawn();
    let generated = |draft: Option<PathBuf>, draft_tokens: usize| {
        let job = submit(
            &engine,
            Command::Generate {
                model: model.clone(),
                prompt: "The keeper".into(),
                options: GenerateOptions {
                    max_new_tokens: 12,
                    draft,
                    draft_tokens,
                    ..GenerateOptions::default()
                },
                apply_chat_template: false,
            },
        );
        match collect(&engine, job, Duration::from_secs(60)).pop() {
            Some(Event::Finished {
                output: JobOutput::Generated { text, stats },
                ..
            }) => Ok((text, stats)),
            Some(Event::Failed { error, .. }) => Err(error),
            other => panic!("expected an end, got {other:?}"),
        }
    };
    let (plain, stats) = generated(None, 4).expect("plain");
    assert_eq!(stats.acceptance_rate(), None);
    let (with_self, stats) = generated(Some(model.clone()), 4).expect("draft");
    assert_eq!(with_self, plain);
    assert!(stats.drafted_tokens > 0);
    assert_eq!(stats.acceptance_rate(), Some(1.0));
    let (with_other, _) = generated(Some(other), 3).expect("other draft");
    assert_eq!(with_other, plain);
    // The draft's arithmetic does not change greedy output.
    let job = submit(
        &engine,
        Command::Generate {
            model: model.clone(),
            prompt: "The keeper".into(),
            options: GenerateOptions {
                max_new_tokens: 12,
                draft: Some(model.clone()),
                draft_numerics: Some(crate::infer::Numerics::LlamaCpu),
                ..GenerateOptions::default()
            },
            apply_chat_template: false,
        },
    );
    match collect(&engine, job, Duration::from_secs(60)).pop() {
        Some(Event::Finished {
            output: JobOutput::Generated { text, .. },
            ..
        }) => assert_eq!(text, plain),
        other => panic!("expected Generated, got {other:?}"),
    }
    let e = generated(Some(model.clone()), 17).expect_err("k out of range");
    assert!(e.contains("1..=16"), "{e}");
    let e = generated(Some(model.join("missing.gguf")), 4).expect_err("no draft");
    assert!(e.contains("missing.gguf"), "{e}");
    engine.shutdown();
}

#[test]
fn chat_session_keeps_the_model_between_turns() {
    let (_dir, model) = fixture_dir("chat");
    let engine = EngineHandle::spawn();
    let job = submit(
        &engine,
        Command::Chat {
            model,
            system: Some("Be brief.".into()),
            options: GenerateOptions {
                max_new_tokens: 4,
                ..GenerateOptions::default()
            },
            context_tokens: Some(512),
        },
    );
    let turn = |text: &str| -> String {
        engine
            .submit(Command::ChatSend {
                job,
                text: text.into(),
            })
            .expect("engine");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ev = engine
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("event");
            match ev {
                Event::TurnFinished { text, .. } => return text,
                e if e.is_terminal() => panic!("chat ended: {e:?}"),
                _ => {}
            }
        }
    };
    let a = turn("Hello");
    let b = turn("And again");
    assert!(a.len() < 200 && b.len() < 200);
    engine.submit(Command::ChatReset { job }).expect("engine");
    let c = turn("Hello");
    assert_eq!(a, c, "greedy replies to the same conversation are the same");
    // Regenerate the last reply: greedy, so the same text again, streamed as a turn.
    engine
        .submit(Command::ChatRegenerate { job })
        .expect("engine");
    let deadline = Instant::now() + Duration::from_secs(60);
    let again = loop {
        match engine
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("event")
        {
            Event::TurnFinished { text, .. } => break text,
            e if e.is_terminal() => panic!("chat ended: {e:?}"),
            _ => {}
        }
    };
    assert_eq!(again, c);
    engine.submit(Command::Cancel(job)).expect("engine");
    let evs = collect(&engine, job, Duration::from_secs(5));
    assert!(matches!(evs.last(), Some(Event::Cancelled { .. })));
    // A turn for a session that is gone fails with a message.
    engine
        .submit(Command::ChatSend {
            job,
            text: "anyone?".into(),
        })
        .expect("engine");
    let evs = collect(&engine, job, Duration::from_secs(5));
    assert!(matches!(evs.last(), Some(Event::Failed { .. })));
    engine.shutdown();
}

#[test]
fn the_model_cache_keeps_the_most_recent_models() {
    let (_dir, model) = fixture_dir("cache");
    let cache = ModelCache::new(1);
    let a = cache.get_or_load(&model).expect("load");
    let b = cache.get_or_load(&model).expect("load");
    assert!(Arc::ptr_eq(&a, &b));
    let other = model
        .parent()
        .map(Path::to_path_buf)
        .expect("parent")
        .join("other");
    write_fixture(&FixtureSpec::tiny_qwen2(), &other).expect("fixture");
    let c = cache.get_or_load(&other).expect("load");
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(cache.len(), 1);
    let d = cache.get_or_load(&model).expect("load");
    assert!(!Arc::ptr_eq(&a, &d), "evicted, so loaded again");
}

#[test]
fn fetch_demo_into_a_file_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, b"x").expect("write");
    let engine = EngineHandle::spawn();
    let job = submit(
        &engine,
        Command::FetchDemo {
            dest: Some(file.clone()),
        },
    );
    let evs = collect(&engine, job, Duration::from_secs(10));
    assert!(
        matches!(
            evs[0],
            Event::Started {
                kind: JobKind::FetchDemo,
                ..
            }
        ),
        "{evs:?}"
    );
    match evs.last() {
        Some(Event::Failed { error, .. }) => {
            assert!(error.contains("not a folder"), "{error}");
            assert!(error.contains(&file.display().to_string()), "{error}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file).expect("read"), b"x");
    engine.shutdown();
}

/// The demo job hands out an F16 dequantization of the shipped (Q4_1/Q8_0) file, made once beside it: the
/// studio then quantizes a float model, not an already-quantized one.
#[test]
#[ignore = "needs SmolLM2 (the demo file itself)"]
fn the_demo_starts_from_an_f16_reference_of_the_shipped_file() {
    use crate::model::summary::ModelSummary;
    use crate::model::SourceModel;
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = dir.path().join(crate::demo::DEMO_MODEL_NAME);
    std::fs::copy(crate::testing::smollm2_gguf(), &shipped).expect("copy");
    let engine = EngineHandle::spawn();
    let job = submit(
        &engine,
        Command::FetchDemo {
            dest: Some(dir.path().to_path_buf()),
        },
    );
    let evs = collect(&engine, job, Duration::from_secs(300));
    let Some(Event::Finished {
        output: JobOutput::DemoModel { path, shipped: s },
        ..
    }) = evs.last()
    else {
        panic!("{:?}", evs.last());
    };
    assert_eq!(s, &shipped);
    assert_eq!(path, &dir.path().join(crate::demo::DEMO_REFERENCE_NAME));
    assert!(evs.iter().any(
        |e| matches!(e, Event::Progress { stage, .. } if stage == crate::demo::STAGE_REFERENCE)
    ));
    let reference = ModelSummary::of(&SourceModel::open(path).expect("open reference"));
    let original = ModelSummary::of(&SourceModel::open(&shipped).expect("open shipped"));
    assert_eq!(reference.dtype, "F16");
    assert_eq!(reference.already_quantized(), None);
    assert!(original.already_quantized().is_some(), "{}", original.dtype);
    assert_eq!(reference.parameter_count, original.parameter_count);
    engine.shutdown();
}
