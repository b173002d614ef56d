//! The `toructl` binary. Everything it does is in the `toructl` crate (`clients/toructl/`),
//! which depends on the API crate alone, so the command line cannot reach the daemon's
//! internals; it is built here, by the daemon's package, so the integration tests can run it.

fn main() -> std::process::ExitCode {
    toructl::main()
}
