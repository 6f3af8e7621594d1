//! Growth, bounds, rings and forks of the KV cache.
use super::*;

#[test]
fn grows_in_chunks_and_refuses_past_max() -> Result<()> {
    let mut c = KvCache::new(2, 8, 300, KvDtype::F16, &Device::Cpu)?;
    assert_eq!(c.nbytes(), 0);
    c.reserve(10)?;
    assert_eq!(c.nbytes(), 2 * 2 * CHUNK * 8 * 2);
    let k = Tensor::ones((10, 8), DType::F32, &Device::Cpu)?;
    c.write(0, 0, &k, &k)?;
    c.write(1, 0, &k, &k)?;
    c.advance(10);
    c.reserve(250)?; // regrows to the bound, 300, keeping the rows
    assert_eq!(c.nbytes(), 2 * 2 * 300 * 8 * 2);
    let Some(Ok(HostKv::F16(l))) = c.host_layer(1) else {
        panic!("a CPU cache of f16 lives in host memory");
    };
    // what is counted is what is held
    assert_eq!((l.k.capacity(), l.v.capacity()), (300 * 8, 300 * 8));
    let wrong = Tensor::ones((2, 7), DType::F32, &Device::Cpu)?;
    assert!(c.write(0, 10, &wrong, &wrong).is_err());
    let Some(Ok(HostKv::F16(l))) = c.host_layer(0) else {
        panic!("a CPU cache of f16 lives in host memory");
    };
    let kept: f32 = l.k[..10 * 8].iter().map(|x| x.to_f32()).sum();
    assert_eq!(kept, 80.0);
    assert!(matches!(
        c.reserve(291),
        Err(Error::ContextOverflow {
            needed: 301,
            max: 300
        })
    ));
    assert_eq!(c.len(), 10);
    Ok(())
}

/// Gemma 3 270M's shape: 15 local layers (window 512) and 3 global ones, one KV head of
/// 256. At 8,192 tokens the local layers hold a ring of 767 rows each; positions map to
/// rows modulo the ring, in at most two runs.
#[test]
fn windowed_layers_keep_a_ring() -> Result<()> {
    let windows: Vec<Option<usize>> = (0..18)
        .map(|i| if (i + 1) % 6 == 0 { None } else { Some(512) })
        .collect();
    let mut c = KvCache::windowed(&windows, 256, 8192, KvDtype::F16, &Device::Cpu)?;
    assert_eq!(c.ring_rows(), 767);
    let full = 18 * 2 * 8192 * 256 * 2;
    let ring = (15 * 767 + 3 * 8192) * 2 * 256 * 2;
    assert_eq!(c.max_nbytes(), ring);
    assert!(ring * 4 < full);
    let k = Tensor::zeros((STEP_ROWS, 256), DType::F32, &Device::Cpu)?;
    while c.len() < 8192 {
        c.reserve(STEP_ROWS)?;
        for i in 0..18 {
            c.write(i, c.len(), &k, &k)?;
        }
        c.advance(STEP_ROWS);
    }
    assert_eq!(c.nbytes(), ring);
    assert_eq!((c.layer_rows(0), c.layer_rows(5)), (767, 8192));
    // The window of position 8191 starts at 7680 = 10 × 767 + 10: one run. 7600..7700
    // wraps at 10 × 767 = 7670.
    assert_eq!(c.spans(0, 7680, 8192), [10..522, 0..0]);
    assert_eq!(c.spans(0, 7600, 7700), [697..767, 0..30]);
    assert_eq!(c.spans(5, 7600, 7700), [7600..7700, 0..0]);
    // a step longer than STEP_ROWS is refused: a ring could not hold it
    let mut fresh = KvCache::windowed(&windows, 256, 8192, KvDtype::F16, &Device::Cpu)?;
    assert!(matches!(
        fresh.reserve(STEP_ROWS + 1),
        Err(Error::InvalidInput(_))
    ));
    Ok(())
}

#[test]
fn a_fork_has_the_rows_and_memory_of_its_own() -> Result<()> {
    let mut c = KvCache::new(2, 8, 300, KvDtype::F32, &Device::Cpu)?;
    c.reserve(5)?;
    let k = Tensor::ones((5, 8), DType::F32, &Device::Cpu)?;
    for i in 0..2 {
        c.write(i, 0, &k, &(&k * 2.0)?)?;
    }
    c.advance(5);
    let mut f = c.fork()?;
    assert_eq!(
        (f.len(), f.nbytes(), f.max_nbytes()),
        (5, c.nbytes(), c.max_nbytes())
    );
    // the fork goes on apart: a row written to it is not in the original
    f.reserve(1)?;
    let three = Tensor::full(3f32, (1, 8), &Device::Cpu)?;
    f.write(1, 5, &three, &three)?;
    f.advance(1);
    let rows = |c: &KvCache| match c.host_layer(1) {
        Some(Ok(HostKv::F32(l))) => (l.k[..6 * 8].to_vec(), l.v[..8].to_vec()),
        _ => panic!("an f32 CPU cache lives in host memory"),
    };
    let (fk, fv) = rows(&f);
    let (ck, _) = rows(&c);
    assert_eq!(fv, vec![2.0; 8], "the prefix's values were copied");
    assert_eq!(&fk[5 * 8..], &[3.0; 8]);
    assert_eq!(&ck[5 * 8..], &[0.0; 8]);
    assert_eq!(c.len(), 5);
    Ok(())
}

#[test]
fn a_prefix_fork_holds_exactly_its_positions_and_goes_on() -> Result<()> {
    let mut c = KvCache::new(2, 8, 300, KvDtype::F32, &Device::Cpu)?;
    c.reserve(20)?;
    for pos in 0..20 {
        let row = Tensor::full(pos as f32, (1, 8), &Device::Cpu)?;
        for i in 0..2 {
            c.write(i, pos, &row, &row)?;
        }
    }
    c.advance(20);
    // an entry: the first 12 positions, bounded by them
    let entry = c.fork_prefix(12, 12)?;
    assert_eq!((entry.len(), entry.max_ctx()), (12, 12));
    assert_eq!(entry.nbytes(), 2 * 2 * 12 * 8 * 4);
    assert_eq!(entry.max_nbytes(), entry.nbytes(), "it never grows");
    // a request going on from 10 of them, with room for 100
    let mut r = entry.fork_prefix(10, 100)?;
    assert_eq!((r.len(), r.max_ctx()), (10, 100));
    r.reserve(1)?;
    let x = Tensor::full(99f32, (1, 8), &Device::Cpu)?;
    r.write(0, 10, &x, &x)?;
    r.advance(1);
    let Some(Ok(HostKv::F32(l))) = r.host_layer(0) else {
        panic!("an f32 CPU cache lives in host memory");
    };
    let firsts: Vec<f32> = (0..11).map(|p| l.k[p * 8]).collect();
    assert_eq!(
        firsts,
        [0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 99.],
        "the prefix's rows, then its own"
    );
    // more than it holds, or a bound below it, is refused
    assert!(entry.fork_prefix(13, 20).is_err());
    assert!(c.fork_prefix(12, 11).is_err());
    Ok(())
}

#[test]
fn a_wrapped_ring_is_only_copied_whole() -> Result<()> {
    let windows = [Some(4), None];
    let mut c = KvCache::windowed(&windows, 8, 300, KvDtype::F32, &Device::Cpu)?;
    let k = Tensor::ones((1, 8), DType::F32, &Device::Cpu)?;
    while c.len() <= c.ring_rows() {
        c.reserve(1)?;
        for i in 0..2 {
            c.write(i, c.len(), &k, &k)?;
        }
        c.advance(1);
    }
    let n = c.len();
    assert!(c.fork_prefix(n - 1, 300).is_err(), "a ring that wrapped");
    let whole = c.fork_prefix(n, 300)?;
    assert_eq!(whole.len(), n);
    Ok(())
}
