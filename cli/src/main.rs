//! `gatehouse`: signing keys, test tokens, and a check of the gatehouse filters in an Envoy
//! config. See `gatehouse --help`.

use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_cli::check::{self, Outcome, Summary};
use gatehouse_cli::keys::{self, KeyAlg, PrivateKey, DEFAULT_RSA_BITS};
use gatehouse_cli::token;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Tools for the gatehouse Envoy filters: signing keys, test tokens, config checks.",
    long_about = "Tools for the gatehouse Envoy filters (jwt-auth, token-proxy).\n\n\
        A typical local setup:\n  \
        gatehouse keygen --alg eddsa --out keys/        # private.jwk.json + jwks.json\n  \
        gatehouse mint --key keys/ --sub alice --aud gatehouse-demo\n  \
        gatehouse check envoy-config/envoy.yaml       # compile every gatehouse filter config"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a signing key: DIR/private.jwk.json (secret, mode 0600) and DIR/jwks.json.
    #[command(long_about = "Generate a signing key pair.\n\n\
        Writes DIR/private.jwk.json, the private key as a JWK with its kid and alg (file mode \
        0600: keep it secret), and DIR/jwks.json, a public JWKS {\"keys\": [...]} with the \
        public key (kty/crv/x/y or n/e, kid, alg, \"use\": \"sig\") to put in jwt-auth's \
        `jwks.inline` or to serve at a JWKS URL. DIR is created if needed; existing files are \
        only replaced with --force.")]
    Keygen {
        /// Signature algorithm of the key.
        #[arg(long, value_enum, ignore_case = true)]
        alg: AlgArg,
        /// Key id [default: the first 16 characters of the key's RFC 7638 thumbprint].
        #[arg(long)]
        kid: Option<String>,
        /// Directory to write private.jwk.json and jwks.json into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// RSA modulus size in bits (rs256 only).
        #[arg(long, default_value_t = DEFAULT_RSA_BITS, value_name = "BITS")]
        bits: usize,
        /// Replace existing key files in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Sign a JWT with a private key and print it.
    #[command(
        long_about = "Sign a JWT (a compact JWS) with a private key and print it.\n\n\
        The header is {\"alg\": <the key's>, \"typ\": \"JWT\", \"kid\": <the key's>}. The claims \
        are iat = now and exp = now + ttl, then --iss/--sub/--aud, then each --claim (a --claim \
        may replace any of them, e.g. --claim exp=1 for an expired token).\n\n\
        Values of --claim and --header are parsed as JSON when they are JSON (5, true, \
        [\"a\",\"b\"], {\"k\":1}, \"123\"), and taken as text otherwise.\n\n\
        Example:\n  \
        gatehouse mint --key keys/ --iss https://gatehouse.local --aud gatehouse-demo \\\n    \
        --sub alice --claim scope='phone:call' --ttl 60"
    )]
    Mint(MintArgs),
    /// Compile every gatehouse filter config in an Envoy config, as Envoy would load it.
    #[command(long_about = "Check the gatehouse filters in an Envoy config.\n\n\
        Reads an Envoy bootstrap config (YAML, or JSON for a .json file), finds every Wasm HTTP \
        filter (@type type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm) wherever \
        it is, and compiles the JSON in its config.configuration (a google.protobuf.StringValue) \
        with the same code the filter runs at load: root_id jwt_auth and token_proxy. Other \
        Wasm filters are listed as skipped. A module file (vm_config.code.local.filename) that \
        is not found under --root only gives a warning.\n\n\
        Prints one line per filter:\n  \
        ok   <name> (root_id jwt_auth) at <path>\n  \
        FAIL <name> (root_id jwt_auth) at <path>: config error at <field>: <why>\n\n\
        Then, for each route of each connection manager with an inline route_config, which \
        gatehouse filters run on it and which of their rules apply (first match wins):\n  \
        route api (virtual host demo, prefix /api/):\n    \
        token_proxy  defaults\n    \
        jwt_auth     rules[1] (route api)\n    \
        page_guard   off (typed_per_filter_config disabled)\n\n\
        Exit status: 0 if every gatehouse filter compiles, 1 if any does not, 2 if the file \
        cannot be read or parsed.")]
    Check {
        /// The Envoy config (.yaml, .yml or .json).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Directory that module file names are resolved against (Envoy's working directory,
        /// or a container image's root for absolute names).
        #[arg(long, default_value = ".", value_name = "DIR")]
        root: PathBuf,
    },
    /// Write page-guard's SRI manifest: URL path -> sha384 of every .js/.mjs/.css under DIR.
    #[command(
        long_about = "Write the SRI manifest for page-guard's `sri.manifest`.\n\n\
        Hashes every .js, .mjs and .css file under DIR (recursively) and prints a JSON object \
        {\"/path/file.js\": \"sha384-...\"}, the keys being the files' URL paths (DIR is the \
        site root) or --prefix followed by them (for files served from another origin). \
        page-guard adds integrity=\"sha384-...\" crossorigin=\"anonymous\" to the <script src> \
        and <link rel=stylesheet href> tags that load them. Regenerate it whenever a file \
        changes: the browser refuses a file whose bytes differ."
    )]
    SriManifest {
        /// The directory served as the site root.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Prefix of the URLs, e.g. https://cdn.example/lib [default: none, paths from `/`].
        #[arg(long, default_value = "")]
        prefix: String,
        /// Write the manifest to FILE instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AlgArg {
    /// Ed25519 (OKP): small keys and signatures, fast, deterministic. Recommended.
    Eddsa,
    /// ECDSA P-256 with SHA-256 (EC).
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA): the most widely supported; large tokens.
    Rs256,
}

impl From<AlgArg> for KeyAlg {
    fn from(a: AlgArg) -> Self {
        match a {
            AlgArg::Eddsa => KeyAlg::EdDsa,
            AlgArg::Es256 => KeyAlg::Es256,
            AlgArg::Rs256 => KeyAlg::Rs256,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen {
            alg,
            kid,
            out,
            bits,
            force,
        } => keygen(alg.into(), kid, out, bits, force),
        Command::Mint(args) => mint(args),
        Command::Check { file, root } => return check(&file, &root),
        Command::SriManifest { dir, prefix, out } => sri_manifest(&dir, &prefix, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse: {e}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(
    alg: KeyAlg,
    kid: Option<String>,
    out: PathBuf,
    bits: usize,
    force: bool,
) -> Result<(), gatehouse_cli::Error> {
    let key = PrivateKey::generate_with_rsa_bits(alg, kid, bits)?;
    let files = keys::write_key_files(&out, &key, force)?;
    println!(
        "wrote {} (private key, mode 0600: keep it secret)",
        files.private_jwk.display()
    );
    println!("wrote {} (public JWKS)", files.jwks.display());
    println!("alg {}, kid {}", key.alg(), key.kid());
    Ok(())
}

#[derive(clap::Args)]
struct MintArgs {
    /// The private JWK file (or the directory holding private.jwk.json).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Lifetime in seconds: exp = now + ttl.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    ttl: u64,
    /// Issuer claim (`iss`).
    #[arg(long)]
    iss: Option<String>,
    /// Audience claim (`aud`); repeat for a list.
    #[arg(long)]
    aud: Vec<String>,
    /// Subject claim (`sub`).
    #[arg(long)]
    sub: Option<String>,
    /// Another claim, as name=value; repeatable.
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    claims: Vec<String>,
    /// A header parameter, as name=value; repeatable. Replaces a default one if named the
    /// same (for negative tests).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// The time to mint at, in unix seconds [default: the current time].
    #[arg(long, value_name = "UNIX")]
    now: Option<u64>,
}

fn mint(a: MintArgs) -> Result<(), gatehouse_cli::Error> {
    let key = PrivateKey::load(&a.key)?;
    let now = match a.now {
        Some(n) => n,
        None => token::unix_now()?,
    };
    let mut claims = Map::new();
    if let Some(iss) = a.iss {
        claims.insert("iss".into(), Value::String(iss));
    }
    if let Some(sub) = a.sub {
        claims.insert("sub".into(), Value::String(sub));
    }
    match a.aud.as_slice() {
        [] => {}
        [one] => {
            claims.insert("aud".into(), Value::String(one.clone()));
        }
        many => {
            claims.insert(
                "aud".into(),
                Value::Array(many.iter().cloned().map(Value::String).collect()),
            );
        }
    }
    for c in &a.claims {
        let (k, v) = token::parse_assignment(c)?;
        claims.insert(k, v);
    }
    let mut header = Map::new();
    for h in &a.headers {
        let (k, v) = token::parse_assignment(h)?;
        header.insert(k, v);
    }
    let jwt = token::mint_with_header(&key, &header, &Value::Object(claims), now, a.ttl)?;
    println!("{jwt}");
    Ok(())
}

fn sri_manifest(
    dir: &std::path::Path,
    prefix: &str,
    out: Option<PathBuf>,
) -> Result<(), gatehouse_cli::Error> {
    let m = gatehouse_cli::sri::manifest(dir, prefix)?;
    let text =
        serde_json::to_string_pretty(&m).map_err(|e| gatehouse_cli::Error::new(e.to_string()))?;
    match out {
        Some(path) => std::fs::write(&path, format!("{text}\n"))
            .map_err(|e| gatehouse_cli::Error::new(format!("{}: {e}", path.display())))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn check(file: &std::path::Path, root: &std::path::Path) -> ExitCode {
    let doc = match check::load_document(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gatehouse check: {e}");
            return ExitCode::from(2);
        }
    };
    let findings = check::check_document(&doc, root);
    let mut out = std::io::stdout().lock();
    let mut lines = Vec::new();
    for f in &findings {
        lines.extend(f.report_lines());
    }
    lines.extend(gatehouse_cli::routes::route_report(&doc));
    let summary = Summary::of(&findings);
    if findings.is_empty() {
        lines.push(format!(
            "no Wasm HTTP filters found in {} (nothing to check)",
            file.display()
        ));
    } else {
        lines.push(summary.to_string());
    }
    for line in lines {
        // A closed pipe (`| head`) is not worth a panic; the exit code still tells.
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    if findings
        .iter()
        .any(|f| matches!(f.outcome, Outcome::Failed(_)))
    {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
