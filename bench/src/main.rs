fn main() { println!("placeholder until the bench harness lands"); }
