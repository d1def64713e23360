//! The `colloquy` binary: parses arguments and hands over to the library.

/// mimalloc rather than the system allocator: the host's hot path makes
/// many small, short-lived allocations from several threads (store
/// records, engine calls), where glibc's malloc spends a quarter of the
/// time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    colloquy::cli::main()
}
