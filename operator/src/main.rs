//! `moe-operator`: runs the controllers, with leader election so that of
//! several replicas exactly one acts at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser;
use futures::FutureExt;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube_lease_manager::LeaseManagerBuilder;
use moe_operator::gang::{GangScheduling, WorkloadFeatures};
use moe_operator::inference;
use moe_operator::metrics::Metrics;
use moe_operator::pods::BuildContext;
use moe_operator::server::{self, Health};
use moe_operator::training;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "moe-operator",
    version,
    about = "Kubernetes operator for MoE training and serving"
)]
struct Args {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MOE_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Worker image for jobs that do not name one.
    #[arg(long, env = "MOE_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MOE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the leader-election Lease (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease (default: the pod name, from POD_NAME, or the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "MOE_LEASE_NAME", default_value = "moe-operator-leader")]
    lease_name: String,
    /// Run without leader election (one replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// How gangs (a training attempt's pods, a serving replica group) that no
    /// Kueue queue admits are scheduled: `none`, pod by pod; `workload-api`,
    /// all or nothing through a PodGroup of Kubernetes' Workload API
    /// (`scheduling.k8s.io/v1alpha2`: feature gates GenericWorkload and
    /// GangScheduling; TopologyAwareWorkloadScheduling for
    /// `placement.topology.required`, WorkloadAwarePreemption for gangs
    /// preempted whole).
    #[arg(long, env = "MOE_GANG_SCHEDULING", value_enum, default_value_t = GangScheduling::None)]
    gang_scheduling: GangScheduling,
    /// Expose MoEInferenceServices with `spec.route` through the Kubernetes
    /// Gateway API: an HTTPRoute (`gateway.networking.k8s.io/v1`) per
    /// service. The cluster must serve HTTPRoutes.
    #[arg(long, env = "MOE_GATEWAY_API")]
    gateway_api: bool,
    /// With --gateway-api: services whose route names an endpoint picker
    /// (`spec.route.inferencePool`) get an InferencePool
    /// (`inference.networking.k8s.io/v1`, the Gateway API Inference
    /// Extension) over their replicas, which their HTTPRoute sends to. The
    /// cluster must serve InferencePools.
    #[arg(long, env = "MOE_INFERENCE_POOL", requires = "gateway_api")]
    inference_pool: bool,
    /// Log format.
    #[arg(long, env = "MOE_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_format == "json" {
        fmt.json().flatten_event(true).init()
    } else {
        fmt.init()
    }

    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    // Fail at start, in words, rather than on every gang later; and learn
    // which of a PodGroup's fields the cluster keeps.
    let workload_features = if args.gang_scheduling == GangScheduling::WorkloadApi {
        let namespace = args
            .watch_namespace
            .as_deref()
            .unwrap_or(&args.lease_namespace);
        let features = moe_operator::gang::probe(&client, namespace).await?;
        info!(
            topology = features.topology,
            preemption = features.preemption,
            "gang scheduling through the Workload API"
        );
        if !features.topology {
            warn!(
                "the cluster drops PodGroup topology constraints (TopologyAwareWorkloadScheduling is off): \
                 placement.topology.required is kept by pod affinity instead"
            );
        }
        features
    } else {
        WorkloadFeatures::default()
    };
    if args.gateway_api {
        moe_operator::inference::route::probe(&client).await?;
        info!("routes through the Gateway API");
    }
    if args.inference_pool {
        moe_operator::inference::pool::probe(&client).await?;
        info!("routes through InferencePools of the Gateway API Inference Extension");
    }
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("moe-operator-{}", std::process::id()));
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        ready: ready.clone(),
        metrics: metrics.clone(),
    };
    let http = tokio::spawn(server::serve(args.http_addr, health));
    info!(addr = %args.http_addr, identity, "moe-operator starting");

    // Leader election: wait for the Lease before acting; exit if it is lost,
    // so the replacement replica starts from a clean slate (as controller-runtime does).
    let mut leadership = None;
    if !args.no_leader_election {
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(15)
            .with_grace(5)
            .with_field_manager("moe-operator")
            .build()
            .await
            .context("leader election set-up")?;
        let (mut channel, task) = manager.watch().await;
        ready.store(true, Ordering::Relaxed); // a standby replica is healthy and ready
        info!(lease = %args.lease_name, namespace = %args.lease_namespace, "waiting for leadership");
        while !*channel.borrow_and_update() {
            channel.changed().await.context("lease manager stopped")?;
        }
        info!("acquired leadership");
        leadership = Some((channel, task));
    }
    ready.store(true, Ordering::Relaxed);

    let build = BuildContext {
        default_worker_image: args
            .worker_image
            .unwrap_or_else(|| BuildContext::default().default_worker_image),
        gang_scheduling: args.gang_scheduling,
        workload_features,
        gateway_api: args.gateway_api,
        inference_pool: args.inference_pool,
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "moe-operator".into(),
            instance: Some(identity),
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
    let stop_reason = Arc::new(std::sync::Mutex::new(None));
    // One stop signal for both controllers (they drain together).
    let shutdown = {
        let stop_reason = stop_reason.clone();
        async move {
            let reason = stop_rx.await.unwrap_or("shutdown");
            *stop_reason.lock().expect("not poisoned") = Some(reason);
        }
    }
    .shared();
    tokio::spawn(async move {
        let lost = async {
            match leadership {
                Some((mut channel, _task)) => {
                    while *channel.borrow_and_update() {
                        if channel.changed().await.is_err() {
                            break;
                        }
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        let reason = tokio::select! {
            _ = tokio::signal::ctrl_c() => "signal",
            _ = terminate() => "signal",
            _ = lost => "lost leadership",
        };
        let _ = stop_tx.send(reason);
    });
    futures::join!(
        training::controller::run(
            client.clone(),
            args.watch_namespace.clone(),
            build.clone(),
            recorder.clone(),
            metrics.clone(),
            shutdown.clone(),
        ),
        inference::controller::run(
            client,
            args.watch_namespace,
            build,
            recorder,
            metrics,
            shutdown,
        ),
    );
    http.abort();
    let reason = stop_reason
        .lock()
        .expect("not poisoned")
        .unwrap_or("shutdown");
    if reason == "lost leadership" {
        error!("lost leadership; exiting so a fresh replica takes over");
        std::process::exit(1);
    }
    info!(reason, "stopped");
    Ok(())
}

async fn terminate() {
    #[cfg(unix)]
    {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}
