fn main() {
    eprintln!("egress: the server is not built yet (see the issue tracker); the protocol core is in proto/");
    std::process::exit(2);
}
