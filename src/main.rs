//! The `colloquy` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    colloquy::cli::main()
}
