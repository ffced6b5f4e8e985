fn main() -> std::process::ExitCode {
    snapship::cli::main()
}
