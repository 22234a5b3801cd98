//! `tern-lab <scenario>`: see the crate docs of `tern_lab`.

fn main() {
    eprintln!("tern-lab: no scenario is built yet");
    std::process::exit(2);
}
