//! The `confab` binary: a thin shell around [`confab::cli::run`].

fn main() {
    std::process::exit(confab::cli::run());
}
