package main

// metrics.go: the Prometheus metrics of the daemon.

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics holds every Prometheus metric the daemon exports, registered on
// its own registry (no global state), served at /metrics.
type metrics struct {
	reg *prometheus.Registry

	webhooks            *prometheus.CounterVec // source, result
	etcdWrites          *prometheus.CounterVec // result
	watchEvents         prometheus.Counter
	watchReconnects     prometheus.Counter
	deploys             *prometheus.CounterVec   // result
	deployDuration      *prometheus.HistogramVec // result
	pulls               *prometheus.CounterVec   // result
	containersStopped   *prometheus.CounterVec   // result
	staleFound          prometheus.Counter
	slackPosts          *prometheus.CounterVec // result
	notifications       *prometheus.CounterVec // service, result
	queued              prometheus.Gauge       // repositories waiting or deploying
	retrying            prometheus.Gauge       // repositories whose failed deploy waits for a retry
	rolloutsHalted      prometheus.Counter
	containersRecreated prometheus.Counter
	wouldRestart        prometheus.Counter
	imagesRemoved       prometheus.Counter
	slotsLost           prometheus.Counter
	slotReleaseFailures prometheus.Counter
	unsupervised        prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		webhooks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_webhooks_received_total", Help: "Webhook requests by source and result.",
		}, []string{"source", "result"}),
		etcdWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_etcd_writes_total", Help: "Trigger writes to etcd by result.",
		}, []string{"result"}),
		watchEvents: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_watch_events_total", Help: "Deploy triggers seen in etcd.",
		}),
		watchReconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_watch_reconnects_total", Help: "Times the etcd watch was re-established.",
		}),
		deploys: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_deploys_total", Help: "Deploys of one repository on this node, by result (ok, noop, error).",
		}, []string{"result"}),
		deployDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "deployer_deploy_duration_seconds", Help: "Time from the start of a deploy to its last container stopped.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
		}, []string{"result"}),
		pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_pulls_total", Help: "Image pulls by result.",
		}, []string{"result"}),
		containersStopped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_containers_stopped_total", Help: "Stale containers stopped, by result.",
		}, []string{"result"}),
		staleFound: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_stale_containers_found_total", Help: "Running containers found on an image their tag no longer points at.",
		}),
		slackPosts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_slack_posts_total", Help: "Slack messages by result (ok, error, dropped).",
		}, []string{"result"}),
		notifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "deployer_notifications_total", Help: "Notifications by service and result (ok, error, dropped).",
		}, []string{"service", "result"}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "deployer_deploy_queue_repositories", Help: "Repositories with a deploy waiting or running on this node.",
		}),
		retrying: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "deployer_deploy_retries_pending", Help: "Repositories whose deploy failed with a retryable error and waits to run again.",
		}),
		rolloutsHalted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_rollouts_halted_total", Help: "Rollouts this node halted because a new version did not come up.",
		}),
		containersRecreated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_containers_recreated_total", Help: "Containers re-created on a new image (-restart_strategy=recreate).",
		}),
		wouldRestart: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_dry_run_would_restart_total", Help: "Stale containers -dry_run left running.",
		}),
		imagesRemoved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_images_removed_total", Help: "Superseded images removed by -cleanup.",
		}),
		slotsLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_rollout_slots_lost_total", Help: "Rollout slots lost with an expired etcd session (while queued or while a container was down).",
		}),
		slotReleaseFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_rollout_slot_release_failures_total", Help: "Rollout slots that could not be freed; the etcd session was ended so that its lease frees them.",
		}),
		unsupervised: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "deployer_unsupervised_containers_total", Help: "Stopped containers nothing replaced; the old container was started again.",
		}),
	}
	m.reg.MustRegister(m.retrying, m.slotsLost, m.slotReleaseFailures, m.unsupervised, m.queued, m.rolloutsHalted, m.containersRecreated, m.wouldRestart, m.imagesRemoved, m.webhooks, m.etcdWrites, m.watchEvents, m.watchReconnects, m.deploys, m.deployDuration,
		m.pulls, m.containersStopped, m.staleFound, m.slackPosts, m.notifications,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
