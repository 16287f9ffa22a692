fn main() -> std::process::ExitCode {
    dotmac_gitops::cli::main()
}
