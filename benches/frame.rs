//! Micro-benchmarks of the pure codec: `cargo bench --bench frame` (add `-- --quick` for a short
//! run). The process-level benchmarks are `cargo run --release -p handoff-bench` (BENCHMARKS.md).
//!
//! - `encode`: `handoff::channel::frame::encode` of the 64-byte object and of a 4 KiB string;
//! - `decode`: `Decoder::decode` over a 256 KiB read full of 64-byte frames, and over one 1 MiB
//!   frame arriving in 64 KiB reads;
//! - `envelope`: decoding reads made of `NODE_HANDLE` frames (the decoder's probe recognises the
//!   internal `cmd`; the envelope parser proper is crate-private and runs in the channel driver).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use handoff::channel::frame::{encode, Decoded, Decoder};
use serde::Serialize;

/// The 64-byte message of the process benchmarks (`bench/src/payload.rs`).
#[derive(Serialize)]
struct Small {
    seq: u64,
    pad: &'static str,
}

const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

fn small(i: u64) -> Small {
    Small { seq: 10_000_000 + i % 90_000_000, pad: PAD }
}

/// A read of `len` bytes or a little less, made of whole copies of `frame`.
fn chunk_of(frame: &[u8], len: usize) -> (Vec<u8>, usize) {
    let count = len / frame.len();
    (frame.repeat(count), count)
}

fn check_frames(out: &[Decoded], expected: usize) {
    assert_eq!(out.len(), expected);
    assert!(out.iter().all(|d| matches!(d, Decoded::Frame(_))));
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let message = small(42);
    assert_eq!(encode(&message).unwrap().len(), 65);
    group.throughput(Throughput::Elements(1));
    group.bench_function("object 64B", |b| b.iter(|| encode(black_box(&message)).unwrap()));

    let text = "x".repeat(4094);
    assert_eq!(encode(&text).unwrap().len(), 4097);
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("string 4KiB", |b| b.iter(|| encode(black_box(text.as_str())).unwrap()));
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");

    let frame = encode(&small(12_345)).unwrap();
    let (chunk, count) = chunk_of(&frame, 256 * 1024);
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("256KiB read of 64B frames", |b| {
        let mut decoder = Decoder::default();
        let mut out = Vec::with_capacity(count);
        b.iter(|| {
            out.clear();
            decoder.decode(black_box(&chunk), Vec::new(), &mut out);
        });
        check_frames(&out, count);
    });

    let big = encode(&"x".repeat((1 << 20) - 2)).unwrap();
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("1MiB frame in 64KiB reads", |b| {
        let mut decoder = Decoder::default();
        let mut out = Vec::with_capacity(1);
        b.iter(|| {
            out.clear();
            for read in big.chunks(64 * 1024) {
                decoder.decode(black_box(read), Vec::new(), &mut out);
            }
        });
        check_frames(&out, 1);
    });
    group.finish();
}

fn bench_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    // What Node (and handoff) write for child.send('socket', socket) from a server.
    let frame = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":\"socket\",\"key\":\"6:127.0.0.1:1337\"}\n";
    let (chunk, count) = chunk_of(frame, 64 * 1024);
    group.throughput(Throughput::Elements(count as u64));
    group.bench_function("NODE_HANDLE frames, 64KiB read", |b| {
        let mut decoder = Decoder::default();
        let mut out = Vec::with_capacity(count);
        b.iter(|| {
            out.clear();
            decoder.decode(black_box(&chunk), Vec::new(), &mut out);
        });
        check_frames(&out, count);
        match &out[0] {
            Decoded::Frame(f) => assert!(f.is_handle()),
            Decoded::Error(e) => panic!("{e}"),
        }
    });

    // One NODE_HANDLE frame with the descriptor that came with it (bound to the frame, then
    // closed with it): the per-handle decode path. Includes dup() and close() of the fd.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    group.throughput(Throughput::Elements(1));
    group.bench_function("NODE_HANDLE frame with fd", |b| {
        let mut decoder = Decoder::default();
        let mut out = Vec::with_capacity(1);
        b.iter_batched(
            || std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned().unwrap(),
            |fd| {
                out.clear();
                decoder.decode(black_box(frame), vec![fd], &mut out);
                match out.first() {
                    Some(Decoded::Frame(f)) => assert!(f.fd.is_some()),
                    _ => panic!("no frame"),
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, bench_encode, bench_decode, bench_envelope);
criterion_main!(benches);
