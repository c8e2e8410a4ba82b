//! The trainer's formulas against independent references, so that a wrong formula fails
//! and not only an inconsistent one: the loss against a plain f64 log-softmax over every
//! position (with the next-token shift at packed-example boundaries derived from the
//! examples themselves), AdamW against values pinned from `torch.optim.AdamW`, the
//! learning-rate schedule against its closed forms and transformers' schedules, gradient
//! accumulation against one large micro-batch, and RMS norm with non-unit weights
//! against finite differences.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use corpusdb::batches::{self, BatchOptions, Tokenized, IGNORE};
use corpusdb::model::{self, weights, Adapter, AttentionMask, DropoutKey, Llama, Lora};
use corpusdb::train::loss::{self, Targets};
use corpusdb::train::optim::{AdamW, Decay, OptimizerConfig, ScheduleConfig};

use crate::model::{
    batch_of, central_difference, lora_config, randomize_b, tiny_config, tiny_model,
};

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn log_sum_exp(row: &[f64]) -> f64 {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// Seeded normal values as f64.
fn normal64(seed: u64, key: u64, n: usize, std: f32) -> Vec<f64> {
    model::rng::normal(seed, &[key], n, std)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// A packed batch of `(ids, trained)` examples; example `i` gets plan position `i`.
fn packed(examples: &[(Vec<u32>, Vec<bool>)], width: usize) -> batches::Batch {
    let rows = examples
        .iter()
        .enumerate()
        .map(|(i, (ids, trained))| {
            (
                i as u64,
                i as u64,
                Tokenized {
                    ids: ids.clone(),
                    trained: trained.clone(),
                },
            )
        })
        .collect();
    let options = BatchOptions {
        batch_size: examples.len(),
        max_seq_len: width,
        packing: true,
        rank: 0,
        ranks: 1,
    };
    batches::assemble(rows, 0, &options).unwrap()
}

// ---------------------------------------------------------------------------------
// 1. The loss against a plain f64 log-softmax.
// ---------------------------------------------------------------------------------

#[test]
fn token_nll_is_the_next_token_log_softmax_within_each_packed_example() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 7, DType::F64);
    // Several examples per row; some train their first token (so that a shift across
    // a packed boundary would find a label there), one has an untrained middle turn,
    // one is fully trained, one trains nothing but its last token.
    let examples: Vec<(Vec<u32>, Vec<bool>)> = vec![
        (vec![2, 5, 7, 9, 11], vec![true, true, true, true, true]),
        (vec![3, 4, 8], vec![true, false, true]),
        (
            vec![1, 6, 10, 12, 13, 14, 15],
            vec![false, false, true, true, false, false, true],
        ),
        (vec![20, 21, 22, 23], vec![true, true, true, true]),
        (vec![30, 31], vec![false, true]),
        (vec![33, 34, 35], vec![true, false, false]),
        (
            vec![36, 37, 38, 39, 0, 1],
            vec![false, false, false, false, false, true],
        ),
    ];
    let width = 11;
    let batch = packed(&examples, width);
    let (rows, w) = batch.input_ids.dims2().unwrap();
    assert_eq!(w, width);
    assert!(rows < examples.len(), "examples share rows ({rows} rows)");

    let ids: Vec<u32> = batch.input_ids.flatten_all().unwrap().to_vec1().unwrap();
    let labels: Vec<i64> = batch.labels.flatten_all().unwrap().to_vec1().unwrap();
    let segments: Vec<u32> = batch.segment_ids.flatten_all().unwrap().to_vec1().unwrap();

    // (a) The targets from the batch tensors: position p of row r predicts p + 1 when
    // both are in the same (non-padding) segment and p + 1 is trained.
    let mut from_tensors: Vec<(usize, u32)> = Vec::new();
    for r in 0..rows {
        for j in 0..width - 1 {
            let (p, q) = (r * width + j, r * width + j + 1);
            if segments[p] != 0 && segments[q] == segments[p] && labels[q] != IGNORE {
                assert_eq!(labels[q], i64::from(ids[q]), "a label is its own token");
                from_tensors.push((p, ids[q]));
            }
        }
    }
    // (b) The same set from the examples themselves: example e starting at flat offset
    // s predicts its token k + 1 at s + k when that token is trained.
    let starts: Vec<u32> = batch.seq_starts.to_vec1().unwrap();
    let mut from_examples: Vec<(usize, u32)> = Vec::new();
    let mut ends = Vec::new();
    for (slot, &e) in batch.positions.iter().enumerate() {
        let (toks, trained) = &examples[e as usize];
        let s = starts[slot] as usize;
        assert_eq!(&ids[s..s + toks.len()], &toks[..], "example {e} is at {s}");
        for k in 0..toks.len() - 1 {
            if trained[k + 1] {
                from_examples.push((s + k, toks[k + 1]));
            }
        }
        ends.push((s + toks.len() - 1, e));
    }
    from_examples.sort();
    assert_eq!(from_tensors, from_examples);

    // The library's targets are exactly this set: in particular the last token of an
    // example never predicts the first token of the next one in its row, and there is
    // such a boundary whose next token carries a label (so the check has teeth).
    let targets = Targets::of(&batch).unwrap();
    let mut library: Vec<(usize, u32)> = targets
        .positions
        .iter()
        .zip(&targets.tokens)
        .map(|(&p, &t)| (p as usize, t))
        .collect();
    library.sort();
    assert_eq!(library, from_examples);
    let mut labelled_boundaries = 0;
    for &(last, e) in &ends {
        assert!(
            !targets.positions.contains(&(last as u32)),
            "the last token of example {e} predicts something"
        );
        let next = last + 1;
        if next % width != 0 && segments[next] != 0 && labels[next] != IGNORE {
            labelled_boundaries += 1;
        }
    }
    assert!(
        labelled_boundaries >= 2,
        "{labelled_boundaries} labelled boundaries"
    );
    // Each target's example is the one of its segment.
    for (i, &p) in targets.positions.iter().enumerate() {
        assert_eq!(targets.examples[i] + 1, segments[p as usize] as usize);
    }

    // Logits of every position from one packed forward pass, then the plain formula.
    let mask = AttentionMask::Packed(std::sync::Arc::new(segments.clone()));
    let logits = model
        .forward(&batch.input_ids, &batch.position_ids, &mask, None, None)
        .unwrap();
    assert_eq!(logits.dims(), &[rows, width, config.vocab_size]);
    let logits = f64s(&logits);
    let vocab = config.vocab_size;
    let reference: HashMap<usize, f64> = from_examples
        .iter()
        .map(|&(p, t)| {
            let row = &logits[p * vocab..(p + 1) * vocab];
            (p, log_sum_exp(row) - row[t as usize])
        })
        .collect();

    let nll = f64s(&loss::token_nll(&model, None, &batch, &targets).unwrap());
    assert_eq!(nll.len(), from_examples.len());
    for (i, &p) in targets.positions.iter().enumerate() {
        let want = reference[&(p as usize)];
        assert!(
            (nll[i] - want).abs() <= 1e-10 * want.abs().max(1.0),
            "position {p}: token_nll {} vs log-softmax {want}",
            nll[i]
        );
    }
    // An off-by-one shift (predicting the token at p itself) would be far off.
    let shifted: f64 = targets
        .positions
        .iter()
        .map(|&p| {
            let p = p as usize;
            let row = &logits[p * vocab..(p + 1) * vocab];
            log_sum_exp(row) - row[ids[p] as usize]
        })
        .sum();
    let total: f64 = nll.iter().sum();
    assert!((total - shifted).abs() > 1e-3, "{total} vs {shifted}");

    // Each example alone, unpacked with a causal mask, gives the same losses.
    for (slot, &e) in batch.positions.iter().enumerate() {
        let (toks, trained) = &examples[e as usize];
        let input = Tensor::new(toks.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos: Vec<u32> = (0..toks.len() as u32).collect();
        let pos = Tensor::new(pos.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let alone = f64s(
            &model
                .forward(&input, &pos, &AttentionMask::Causal, None, None)
                .unwrap(),
        );
        let s = starts[slot] as usize;
        for k in 0..toks.len() - 1 {
            if !trained[k + 1] {
                continue;
            }
            let row = &alone[k * vocab..(k + 1) * vocab];
            let want = log_sum_exp(row) - row[toks[k + 1] as usize];
            let i = targets
                .positions
                .iter()
                .position(|&p| p as usize == s + k)
                .unwrap();
            assert!(
                (nll[i] - want).abs() <= 1e-9 * want.abs().max(1.0),
                "example {e} token {k}: packed {} vs alone {want}",
                nll[i]
            );
        }
    }
}

#[test]
fn nll_of_logits_matches_the_plain_formula_on_known_answers() {
    let device = Device::Cpu;
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        let close = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() <= tol * want.abs().max(1.0),
                "{dtype:?} {what}: {got} vs {want}"
            )
        };
        // Uniform logits: ln(vocab) whatever the level and the target.
        for level in [0.0, 5.0, -300.0] {
            let logits = Tensor::full(level, (3, 7), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let nll = f64s(&loss::nll_of_logits(&logits, &[0, 3, 6]).unwrap());
            for v in nll {
                close(v, 7f64.ln(), "uniform");
            }
        }
        // exp(logits) = 1, 2, 3, 4: the probabilities are k / 10.
        let row = [0.0, 2f64.ln(), 3f64.ln(), 4f64.ln()];
        let logits = Tensor::new(&[row, row, row, row], &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let nll = f64s(&loss::nll_of_logits(&logits, &[0, 1, 2, 3]).unwrap());
        for (k, v) in nll.into_iter().enumerate() {
            close(v, (10.0 / (k as f64 + 1.0)).ln(), "1:2:3:4");
        }
        // Large logits stay finite: -ln(1 / (1 + e^-1000)) = 0, and 1000 for the other.
        let logits = Tensor::new(&[[1000.0f64, 0.0], [1000.0, 0.0]], &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let nll = f64s(&loss::nll_of_logits(&logits, &[0, 1]).unwrap());
        close(nll[0], 0.0, "confident and right");
        close(nll[1], 1000.0, "confident and wrong");
    }

    // Random logits, value and gradient: d(Σ_r g_r · nll_r)/dlogits = g_r · (softmax - onehot).
    let (rows, vocab) = (5, 11);
    let values = normal64(3, 1, rows * vocab, 3.0);
    let tokens = [0u32, 10, 4, 4, 7];
    let weights = [1.0, -0.5, 2.0, 0.25, 3.0];
    let logits =
        Var::from_tensor(&Tensor::from_vec(values.clone(), (rows, vocab), &device).unwrap())
            .unwrap();
    let nll = loss::nll_of_logits(logits.as_tensor(), &tokens).unwrap();
    let got = f64s(&nll);
    let g = Tensor::new(&weights, &device).unwrap();
    let grads = (nll * g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = f64s(grads.get(logits.as_tensor()).unwrap());
    for r in 0..rows {
        let row = &values[r * vocab..(r + 1) * vocab];
        let lse = log_sum_exp(row);
        let want = lse - row[tokens[r] as usize];
        assert!((got[r] - want).abs() <= 1e-12 * want.abs().max(1.0));
        for (k, &x) in row.iter().enumerate() {
            let onehot = if k == tokens[r] as usize { 1.0 } else { 0.0 };
            let want = weights[r] * ((x - lse).exp() - onehot);
            assert!(
                (grad[r * vocab + k] - want).abs() <= 1e-12,
                "d nll[{r}] / d logit {k}: {} vs {want}",
                grad[r * vocab + k]
            );
        }
    }
    // A target outside the vocabulary is refused.
    assert!(loss::nll_of_logits(logits.as_tensor(), &[0, 1, 2, 3, 11]).is_err());
}

// ---------------------------------------------------------------------------------
// 2. AdamW against PyTorch.
// ---------------------------------------------------------------------------------

// The values below come from torch 2.15.0 (float64), with this script:
//
// ```python
// import torch
// torch.set_default_dtype(torch.float64)
// p1 = torch.nn.Parameter(torch.tensor([[0.5, -1.25, 2.0], [0.0, 3.0, -0.75]]))
// p2 = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.25, 4.0]))
// grads = [
//     ([[0.1, -0.2, 0.3], [0.05, -0.4, 1e-7]], [0.02, -0.5, 0.0, 0.3]),
//     ([[-0.3, 0.1, 0.25], [0.2, 0.1, -1e-7]], [0.1, 0.05, 0.0, -0.2]),
//     ([[0.05, 0.05, -0.1], [-0.1, 0.3, 2e-7]], [-0.05, 0.2, 1e-6, 0.1]),
// ]
// opt = torch.optim.AdamW([p1, p2], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
// for lr, (g1, g2) in zip([1e-2, 5e-3, 1e-3], grads):
//     for group in opt.param_groups:
//         group["lr"] = lr
//     p1.grad = torch.tensor(g1)
//     p2.grad = torch.tensor(g2)
//     opt.step()
//     print([repr(x) for x in p1.detach().flatten().tolist()],
//           [repr(x) for x in p2.detach().tolist()])
// ```
//
// The tiny gradients (1e-7) make eps's place matter; p2[2]'s zero gradient for two
// steps leaves it changed by the decoupled decay alone (0.25 · (1 - lr · 0.1)). The same
// script with `torch.optim.Adam(..., weight_decay=0.1)` (L2-style decay) ends at
// p1 = [0.49148709810094665, -1.2356985737601445, 1.984166900866559, ...], about 1e-3
// away: far outside the tolerance.
const ADAMW_P1: [[f64; 6]; 3] = [
    [
        0.4895000009999999,
        -1.2387500005,
        1.9880000003333334,
        -0.009999998000000399,
        3.00699999975,
        -0.758340909090909,
    ],
    [
        0.49172620005550327,
        -1.236798940385684,
        1.982050136139714,
        -0.014416880150608657,
        3.007843840525634,
        -0.7577225041866028,
    ],
    [
        0.49195452561422015,
        -1.236613871633496,
        1.9812683255368966,
        -0.014751537842419313,
        3.0074603177543757,
        -0.75811207741443,
    ],
];
const ADAMW_P2: [[f64; 4]; 3] = [
    [
        0.9890000049999975,
        -1.9880000002,
        0.24975,
        3.986000000333333,
    ],
    [
        0.9842002742840491,
        -1.9840427577120476,
        0.249625125,
        3.9832843977129295,
    ],
    [
        0.9837856283733213,
        -1.9836552042970321,
        0.24897221973787706,
        3.9826075603722186,
    ],
];

#[test]
fn adamw_matches_torch_optim_adamw() {
    let device = Device::Cpu;
    let g1: [[f64; 6]; 3] = [
        [0.1, -0.2, 0.3, 0.05, -0.4, 1e-7],
        [-0.3, 0.1, 0.25, 0.2, 0.1, -1e-7],
        [0.05, 0.05, -0.1, -0.1, 0.3, 2e-7],
    ];
    let g2: [[f64; 4]; 3] = [
        [0.02, -0.5, 0.0, 0.3],
        [0.1, 0.05, 0.0, -0.2],
        [-0.05, 0.2, 1e-6, 0.1],
    ];
    let rates = [1e-2, 5e-3, 1e-3];
    // The trainer's parameters are f32; f64 shows the formula exactly.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        let tensor = |values: &[f64], shape: &[usize]| {
            Tensor::from_vec(values.to_vec(), shape, &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let p1 = Var::from_tensor(&tensor(&[0.5, -1.25, 2.0, 0.0, 3.0, -0.75], &[2, 3])).unwrap();
        let p2 = Var::from_tensor(&tensor(&[1.0, -2.0, 0.25, 4.0], &[4])).unwrap();
        let params = [("p1".to_string(), &p1), ("p2".to_string(), &p2)];
        let mut optimizer = AdamW::new(OptimizerConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: 0.0,
        });
        for step in 0..3 {
            let grads: HashMap<String, Tensor> = [
                ("p1".to_string(), tensor(&g1[step], &[2, 3])),
                ("p2".to_string(), tensor(&g2[step], &[4])),
            ]
            .into_iter()
            .collect();
            optimizer.step(&params, &grads, rates[step]).unwrap();
            assert_eq!(optimizer.steps, step as u64 + 1);
            for (name, got, want) in [
                ("p1", f64s(p1.as_tensor()), &ADAMW_P1[step][..]),
                ("p2", f64s(p2.as_tensor()), &ADAMW_P2[step][..]),
            ] {
                for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= tol * w.abs(),
                        "{dtype:?} step {}: {name}[{i}] = {g}, torch {w}",
                        step + 1
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// 3. The learning-rate schedule.
// ---------------------------------------------------------------------------------

// transformers 5.24.0, the rate optimizer step i (0-based) uses, peak 2e-4, 20 steps,
// 4 warmup steps (`opt.param_groups[0]["lr"]` before each `opt.step(); sched.step()`):
// get_cosine_with_min_lr_schedule_with_warmup(opt, 4, 20, min_lr_rate=0.1),
// get_linear_schedule_with_warmup(opt, 4, 20), get_constant_schedule_with_warmup(opt, 4).
const HF_COSINE_MIN_0_1: [f64; 20] = [
    0.0,
    5e-05,
    0.0001,
    0.00015000000000000001,
    0.0002,
    0.00019827067523629075,
    0.00019314915792601581,
    0.0001848322651072291,
    0.00017363961030678927,
    0.00016000132097176422,
    0.00014444150891285807,
    0.00012755812898145155,
    0.00011000000000000002,
    9.244187101854847e-05,
    7.555849108714192e-05,
    5.9998679028235824e-05,
    4.6360389693210735e-05,
    3.516773489277092e-05,
    2.6850842073984196e-05,
    2.1729324763709264e-05,
];
const HF_LINEAR: [f64; 20] = [
    0.0,
    5e-05,
    0.0001,
    0.00015000000000000001,
    0.0002,
    0.0001875,
    0.000175,
    0.00016250000000000002,
    0.00015000000000000001,
    0.0001375,
    0.000125,
    0.00011250000000000001,
    0.0001,
    8.75e-05,
    7.500000000000001e-05,
    6.25e-05,
    5e-05,
    3.7500000000000003e-05,
    2.5e-05,
    1.25e-05,
];

fn schedule(warmup: u64, decay: Decay, min: f64) -> ScheduleConfig {
    ScheduleConfig {
        warmup_steps: Some(warmup),
        warmup_ratio: 0.0,
        decay,
        min_lr_ratio: min,
    }
}

fn assert_rate(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn the_schedule_follows_its_closed_forms_and_transformers_after_warmup() {
    use std::f64::consts::PI;
    let (peak, steps, warmup) = (2e-4, 20u64, 4u64);
    let min = 0.1;
    let floor = peak * min;
    // Warmup (the same for every decay): step s of w rises linearly as (s + 1) / (w + 1),
    // so the first step already moves and step w is the first at the peak. transformers
    // uses s / w instead (a rate of 0 at the first step of a warmup): a
    // difference pinned here so that it does not change unnoticed.
    let warm = |s: u64| peak * (s + 1) as f64 / (warmup + 1) as f64;
    let progress = |s: u64| (s - warmup) as f64 / (steps - warmup) as f64;
    let cosine = |s: u64| floor + (peak - floor) * 0.5 * (1.0 + (PI * progress(s)).cos());
    let linear = |s: u64, floor: f64| floor + (peak - floor) * (1.0 - progress(s));
    let checked = [0u64, 1, 3, 4, 5, 12, 18, 19];
    for decay in [Decay::Cosine, Decay::Linear, Decay::Constant] {
        let config = schedule(warmup, decay, min);
        for &s in &checked {
            let want = match (s < warmup, decay) {
                (true, _) => warm(s),
                (false, Decay::Cosine) => cosine(s),
                (false, Decay::Linear) => linear(s, floor),
                (false, Decay::Constant) => peak,
            };
            assert_rate(
                config.rate(peak, s, steps),
                want,
                &format!("{decay:?} step {s}"),
            );
        }
    }
    // Spot values by hand: the first step, the end of warmup, the middle of the decay,
    // the last step (one step short of the floor, as in transformers).
    let cos = schedule(warmup, Decay::Cosine, min);
    assert_rate(cos.rate(peak, 0, steps), 4e-5, "cosine first");
    assert_rate(cos.rate(peak, 3, steps), 1.6e-4, "cosine last warmup step");
    assert_rate(cos.rate(peak, 4, steps), 2e-4, "cosine at the peak");
    assert_rate(cos.rate(peak, 12, steps), 1.1e-4, "cosine half way");
    assert_rate(
        cos.rate(peak, 19, steps),
        2e-5 + 1.8e-4 * 0.5 * (1.0 + (PI * 15.0 / 16.0).cos()),
        "cosine last",
    );
    let lin = schedule(warmup, Decay::Linear, min);
    assert_rate(lin.rate(peak, 12, steps), 1.1e-4, "linear half way");
    assert_rate(
        lin.rate(peak, 19, steps),
        2e-5 + 1.8e-4 / 16.0,
        "linear last",
    );

    // After warmup, transformers' schedules exactly: cosine with min_lr_rate, linear
    // (which has no floor: min_lr_ratio 0) and constant.
    let lin0 = schedule(warmup, Decay::Linear, 0.0);
    let constant = schedule(warmup, Decay::Constant, min);
    for s in warmup..steps {
        let i = s as usize;
        assert_rate(cos.rate(peak, s, steps), HF_COSINE_MIN_0_1[i], "hf cosine");
        assert_rate(lin0.rate(peak, s, steps), HF_LINEAR[i], "hf linear");
        assert_rate(constant.rate(peak, s, steps), peak, "hf constant");
    }
    // During warmup both ramps are linear and reach the peak at step w; they differ by
    // one step's offset (ours (s + 1) / (w + 1), transformers' s / w).
    for s in 0..warmup {
        let ours = cos.rate(peak, s, steps);
        assert!(ours > HF_COSINE_MIN_0_1[s as usize] && ours < peak);
        assert_rate(
            HF_COSINE_MIN_0_1[s as usize],
            peak * s as f64 / warmup as f64,
            "hf warmup",
        );
    }

    // No warmup: the first step is at the peak.
    for decay in [Decay::Cosine, Decay::Linear, Decay::Constant] {
        assert_rate(
            schedule(0, decay, min).rate(peak, 0, steps),
            peak,
            "no warmup",
        );
    }
    // The warmup from a ratio is round(ratio · steps), at most steps - 1.
    let ratio = |r: f64| ScheduleConfig {
        warmup_steps: None,
        warmup_ratio: r,
        decay: Decay::Constant,
        min_lr_ratio: min,
    };
    // 0.1 · 20 = 2 warmup steps: step 1 is 2/3 of the peak, step 2 the peak.
    assert_rate(
        ratio(0.1).rate(peak, 1, steps),
        peak * 2.0 / 3.0,
        "ratio 0.1",
    );
    assert_rate(ratio(0.1).rate(peak, 2, steps), peak, "ratio 0.1 peak");
    // 0.03 · 40 = 1.2 rounds to 1 (transformers' ceil would give 2).
    assert_rate(
        ratio(0.03).rate(peak, 0, 40),
        peak / 2.0,
        "ratio 0.03 of 40",
    );
    assert_rate(
        ratio(0.03).rate(peak, 1, 40),
        peak,
        "ratio 0.03 of 40, step 1",
    );
    // A one-step phase runs at the peak whatever the warmup.
    assert_rate(
        schedule(5, Decay::Cosine, min).rate(peak, 0, 1),
        peak,
        "one step",
    );
}

// ---------------------------------------------------------------------------------
// 4. Gradient accumulation.
// ---------------------------------------------------------------------------------

/// Gradients of `Σ token_nll` over `batch` for every LoRA variable, and the target count.
fn summed_gradients(model: &Llama, lora: &Lora, batch: &batches::Batch) -> (Vec<Vec<f64>>, usize) {
    let targets = Targets::of(batch).unwrap();
    let adapter = Adapter {
        lora,
        dropout: Some(DropoutKey {
            seed: 1,
            step: 0,
            micro_batch: 0,
        }),
    };
    let grads = loss::token_nll(model, Some(adapter), batch, &targets)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let per_var = lora
        .named_vars()
        .into_iter()
        .map(|(key, var)| {
            f64s(
                grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient reaches {key}")),
            )
        })
        .collect();
    (per_var, targets.len())
}

#[test]
fn k_micro_batches_give_the_gradient_of_one_k_times_larger_batch() {
    let config = tiny_config(40);
    let model = tiny_model(&config, 8, DType::F64);
    let lora = Lora::with_dtype(lora_config(3, 0.0), &config, 5, &Device::Cpu, DType::F64).unwrap();
    randomize_b(&lora, 13);
    let sequences: Vec<Vec<u32>> = vec![
        vec![2, 5, 7, 9, 11],
        vec![3, 4, 8],
        vec![1, 6, 10, 12, 13, 14],
        vec![20, 21, 22, 23, 24, 25, 26],
        vec![30, 31, 32, 33],
        vec![35, 36, 37, 38, 39, 0, 1, 2],
    ];
    let (k, b, width) = (3, 2, 12);
    let whole = batch_of(&sequences, width);
    let (whole_grads, whole_n) = summed_gradients(&model, &lora, &whole);
    let mut sum: Vec<Vec<f64>> = whole_grads.iter().map(|g| vec![0.0; g.len()]).collect();
    let mut n = 0;
    let mut each = Vec::new();
    for chunk in sequences.chunks(b) {
        let (grads, count) = summed_gradients(&model, &lora, &batch_of(chunk, width));
        for (s, g) in sum.iter_mut().zip(&grads) {
            for (s, g) in s.iter_mut().zip(g) {
                *s += g;
            }
        }
        each.push(grads);
        n += count;
    }
    assert_eq!(each.len(), k);
    assert_eq!(n, whole_n);
    assert_eq!(n, sequences.iter().map(|s| s.len() - 1).sum::<usize>());
    let names: Vec<String> = lora.named_vars().into_iter().map(|(k, _)| k).collect();
    let mut largest_a = 0f64;
    for (i, name) in names.iter().enumerate() {
        for (j, (&whole, &acc)) in whole_grads[i].iter().zip(&sum[i]).enumerate() {
            let (whole, acc) = (whole / whole_n as f64, acc / n as f64);
            assert!(
                (whole - acc).abs() <= 1e-10,
                "{name}[{j}]: one batch {whole} vs accumulated {acc}"
            );
        }
        let norm = whole_grads[i].iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm > 1e-8, "{name}: no gradient");
        if name.ends_with("lora_A.weight") {
            largest_a = largest_a.max(norm);
        }
        // Each micro-batch alone is not the whole gradient (the sum matters).
        let alone = each[0][i].iter().map(|g| g / n as f64);
        let differs = alone
            .zip(&whole_grads[i])
            .any(|(a, w)| (a - w / whole_n as f64).abs() > 1e-8);
        assert!(
            differs,
            "{name}: one micro-batch already gives the whole gradient"
        );
    }
    assert!(largest_a > 1e-6, "A has gradients");
}

// ---------------------------------------------------------------------------------
// 5. RMS norm with weights that are not all ones.
// ---------------------------------------------------------------------------------

#[test]
fn rms_norm_with_non_unit_weights_matches_the_formula_and_finite_differences() {
    let device = Device::Cpu;
    let (rows, dim) = (3, 8);
    let x0 = normal64(21, 1, rows * dim, 1.0);
    // Weights around 1, some far from it (one negative).
    let mut w: Vec<f64> = normal64(21, 2, dim, 0.5).iter().map(|v| 1.0 + v).collect();
    w[3] = -0.7;
    assert!(w.iter().any(|v| (v - 1.0).abs() > 0.3));
    let c = normal64(21, 3, rows * dim, 1.0);
    let weight = Tensor::from_vec(w.clone(), dim, &device).unwrap();
    let c_t = Tensor::from_vec(c.clone(), (rows, dim), &device).unwrap();
    for eps in [1e-5, 0.5] {
        // Forward: x_i · w_i / √(mean(x²) + ε) per row.
        let plain = |x: &[f64]| -> Vec<f64> {
            x.chunks(dim)
                .flat_map(|row| {
                    let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
                    let r = 1.0 / (ms + eps).sqrt();
                    row.iter()
                        .zip(&w)
                        .map(move |(v, w)| v * w * r)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let x =
            Var::from_tensor(&Tensor::from_vec(x0.clone(), (rows, dim), &device).unwrap()).unwrap();
        let y = model::rms_norm(x.as_tensor(), &weight, eps).unwrap();
        for (got, want) in f64s(&y).iter().zip(plain(&x0)) {
            assert!(
                (got - want).abs() <= 1e-13 * want.abs().max(1.0),
                "eps {eps}: {got} vs {want}"
            );
        }
        // Backward of Σ rms_norm(x) · c against central differences of the plain formula
        // and of the library's forward.
        let grads = (y * &c_t).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = f64s(grads.get(x.as_tensor()).unwrap());
        let objective = |x: &[f64]| plain(x).iter().zip(&c).map(|(y, c)| y * c).sum::<f64>();
        let library = |x: &[f64]| {
            let t = Tensor::from_vec(x.to_vec(), (rows, dim), &device).unwrap();
            let y = model::rms_norm(&t, &weight, eps).unwrap();
            f64s(&(y * &c_t).unwrap().sum_all().unwrap())[0]
        };
        let h = 1e-6;
        for i in 0..rows * dim {
            let at = |f: &dyn Fn(&[f64]) -> f64, d: f64| {
                let mut x = x0.clone();
                x[i] += d;
                f(&x)
            };
            for (what, f) in [
                ("formula", &objective as &dyn Fn(&[f64]) -> f64),
                ("library", &library),
            ] {
                let numeric = (at(f, h) - at(f, -h)) / (2.0 * h);
                assert!(
                    (numeric - grad[i]).abs() <= 1e-8 + 1e-6 * numeric.abs(),
                    "eps {eps}, x[{i}]: finite difference of the {what} {numeric} vs backprop {}",
                    grad[i]
                );
            }
        }
        // The weights matter to the gradient (ones would give another one).
        let ones = Tensor::ones(dim, DType::F64, &device).unwrap();
        let y1 = model::rms_norm(x.as_tensor(), &ones, eps).unwrap();
        let g1 = (y1 * &c_t).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = f64s(g1.get(x.as_tensor()).unwrap());
        assert!(g1.iter().zip(&grad).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

#[test]
fn finite_differences_agree_with_backprop_with_non_unit_norm_weights() {
    let config = tiny_config(40);
    let mut tensors = weights::random_tensors(&config, 3);
    // The random model's norms are ones; give every norm its own random weights around 1.
    let mut norm_names: Vec<String> = tensors
        .keys()
        .filter(|n| n.ends_with("layernorm.weight") || *n == "model.norm.weight")
        .cloned()
        .collect();
    norm_names.sort();
    assert_eq!(norm_names.len(), 2 * config.num_hidden_layers + 1);
    let h = config.hidden_size;
    for (i, name) in norm_names.iter().enumerate() {
        let values: Vec<f32> = model::rng::normal(31, &[i as u64], h, 0.3)
            .into_iter()
            .map(|v| 1.0 + v)
            .collect();
        tensors.insert(
            name.clone(),
            Tensor::from_vec(values, h, &Device::Cpu).unwrap(),
        );
    }
    let load = |tensors: &HashMap<String, Tensor>| {
        Llama::from_tensors(
            config.clone(),
            |n| Ok(tensors.get(n).cloned()),
            &Device::Cpu,
            DType::F64,
        )
        .unwrap()
    };
    let model = load(&tensors);
    for norm in model
        .layers
        .iter()
        .flat_map(|l| [&l.input_norm, &l.post_attention_norm])
        .chain([&model.norm])
    {
        let far = f64s(norm)
            .iter()
            .map(|v| (v - 1.0).abs())
            .fold(0.0, f64::max);
        assert!(far > 0.2, "a norm weight stayed near one");
    }
    let lora = Lora::with_dtype(lora_config(3, 0.1), &config, 5, &Device::Cpu, DType::F64).unwrap();
    randomize_b(&lora, 11);
    let batch = batch_of(
        &[
            vec![2, 5, 7, 9, 11],
            vec![3, 4, 8],
            vec![1, 6, 10, 12, 13, 14],
        ],
        8,
    );
    let targets = Targets::of(&batch).unwrap();
    let key = DropoutKey {
        seed: 1,
        step: 0,
        micro_batch: 0,
    };
    let loss_of = |model: &Llama| -> Tensor {
        let adapter = Adapter {
            lora: &lora,
            dropout: Some(key),
        };
        loss::token_nll(model, Some(adapter), &batch, &targets)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    // The norms change the loss (else this test would be the one in tests/model.rs).
    let unit = load(&weights::random_tensors(&config, 3));
    let (with, without) = (
        loss_of(&model).to_scalar::<f64>().unwrap(),
        loss_of(&unit).to_scalar::<f64>().unwrap(),
    );
    assert!((with - without).abs() > 1e-3, "{with} vs {without}");

    let grads = loss_of(&model).backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (key, var) in lora.named_vars() {
        let grad = f64s(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reaches {key}")),
        );
        assert!(grad.iter().any(|g| g.abs() > 1e-9), "{key}: zero gradient");
        let original = f64s(var.as_tensor());
        for &i in &[0, original.len() / 3, original.len() - 1] {
            let numeric =
                central_difference(var, i, eps, || loss_of(&model).to_scalar::<f64>().unwrap());
            assert!(
                (numeric - grad[i]).abs() <= 1e-6 + 1e-4 * numeric.abs(),
                "{key}[{i}]: finite difference {numeric} vs backprop {}",
                grad[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 7 * 2 * 3);
}
