// Command deployer is a per-node continuous-deployment daemon.
//
// A registry says a new image was pushed (a Docker Hub webhook or a
// registry notification); one deployer records the repository in etcd;
// the deployer on every node watches etcd, pulls the new version of every
// local tag of that repository and stops the containers that still run the
// old image, so that their supervisor (a systemd or fleet unit with
// Restart=always) starts them again on the new one. Slack is told.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
)

// version is set with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// A second signal stops the process at once: after stop(), the
		// default handlers are back.
		<-ctx.Done()
		stop()
	}()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errInvalidFlag) || errors.Is(err, errUsage):
		fmt.Fprintln(os.Stderr, "deployer:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "deployer:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

// run is the whole daemon; it returns when ctx is done and everything has
// stopped.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "status" {
		return statusCommand(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "secret" {
		return secretCommand(ctx, args[1:], stdout, stderr)
	}
	cfg, err := parseFlags("deployer", args, os.Getenv, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) || errors.Is(err, errInvalidFlag) {
			return err
		}
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	log := newLogger(cfg.LogFormat, stderr)
	log.Info("starting deployer", "version", version, "node", cfg.NodeName, "listen", cfg.Listen)
	hostname, _ := os.Hostname()
	warnContainerHostname(log, cfg.NodeName, hostname)
	return serve(ctx, cfg, log)
}

func newLogger(format string, w io.Writer) *slog.Logger {
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}

// serve runs every component until ctx is done, then stops them in order:
// the HTTP server and the watcher first, deploys in flight within a bound,
// then the state writers and the etcd client.
func serve(ctx context.Context, cfg config, log *slog.Logger) error {
	if len(cfg.EtcdNodes) == 0 {
		etcd, err := startEmbeddedEtcd(cfg, log)
		if err != nil {
			return err
		}
		defer closeWithin(etcd.Close, 10*time.Second, log)
	}
	cli, err := newEtcdClient(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer cli.Close()

	dockerClient, err := newDockerClient(ctx, cfg, log)
	if err != nil {
		return err
	}
	d, err := newDaemon(cfg, cli, dockerClient, log)
	if err != nil {
		return err
	}
	return d.run(ctx)
}

// closeWithin runs stop, giving up after d: a stop must not hang on a
// component that cannot shut down (an embedded etcd whose disk is gone).
func closeWithin(stop func(), d time.Duration, log *slog.Logger) {
	done := make(chan struct{})
	go func() { stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		log.Warn("gave up waiting for the embedded etcd to stop", "after", d)
	}
}

// dockerAPI is everything the daemon's components use from Docker,
// gathered only to build them from one client.
type dockerAPI interface {
	imageAPI
	containerAPI
	recreateAPI
	upAPI
	imageRemover
	PingWithContext(ctx context.Context) error
}

// daemon wires the components together.
type daemon struct {
	cfg       config
	log       *slog.Logger
	metrics   *metrics
	etcd      *clientv3.Client
	docker    dockerAPI
	webhook   *webhook
	watcher   *watcher
	progress  *progress
	queue     *deployQueue
	repuller  *repuller
	rollout   *rollout
	recreator *recreator
	status    *statusReporter
	slack     *slackNotifier // nil when Slack is off
	failures  *failLimiter   // failed authentications per address
	health    *healthCache
	claim     *nodeClaim    // the node name, held while running
	listener  net.Listener  // set by run; tests read its address
	ready     chan struct{} // closed once listening
}

func newDaemon(cfg config, cli *clientv3.Client, dc dockerAPI, log *slog.Logger) (*daemon, error) {
	m := newMetrics()
	d := &daemon{cfg: cfg, log: log, metrics: m, etcd: cli, docker: dc, ready: make(chan struct{})}
	var note notifier = nopNotifier{}
	if cfg.SlackWebhookURL != "" {
		d.slack = newSlackNotifier(cfg.SlackWebhookURL, cfg.SlackUsername, log.With("component", "slack"), m)
		note = d.slack
	}
	wait := newUpWaiter(dc, cfg.RestartTimeout, callTimeout, log.With("component", "rollout"), m)
	rs := &restarter{
		docker: dc, wait: wait, killTimeout: cfg.killTimeout, selfID: selfContainerID(), callTimeout: callTimeout,
		log: log.With("component", "restarter"), metrics: m,
	}
	d.rollout = newRollout(cli, cfg.EtcdPrefix, cfg.NodeName, cfg.MaxUnavailable, cfg.SlotTimeout, callTimeout, log.With("component", "rollout"), m)
	d.recreator = &recreator{docker: dc, stopper: rs, wait: wait, callTimeout: callTimeout, log: log.With("component", "recreate"), metrics: m}
	rep := &replacer{rollout: d.rollout, restarter: rs, recreator: d.recreator, strategy: cfg.RestartStrategy, log: log.With("component", "rollout")}
	dep := newDeployer(newPuller(dc, cfg.DockerCfg, log.With("component", "puller"), m), rep, dc, note, cfg.NodeName, log.With("component", "deployer"), m)
	dep.dryRun, dep.cleanup = cfg.DryRun, cfg.Cleanup
	m.reg.MustRegister(newSkewCollector(cli, cfg.EtcdPrefix))
	d.progress = newProgress(cli, progressKey(cfg.EtcdPrefix, cfg.NodeName), log.With("component", "progress"))
	d.status = &statusReporter{
		docker: dc, events: eventsFor(dc, callTimeout), rollout: d.rollout, prefix: cfg.EtcdPrefix, node: cfg.NodeName, started: time.Now().UTC(),
		period: statusResync, callTimeout: callTimeout, log: log.With("component", "status"),
		wake: make(chan struct{}, 1), cache: map[string]containerStatus{},
	}
	d.queue = newDeployQueue(cfg.MaxThreads, func(ctx context.Context, j job) error {
		err := dep.deploy(ctx, j)
		d.status.poke()
		return err
	}, d.progress.done)
	d.queue.queued = m.queued
	d.queue.retrying = m.retrying
	d.status.retries = d.queue.pending
	d.watcher = newWatcher(cli, cfg.EtcdPrefix, cfg.NodeName, cfg.EtcdRetryDelay, !cfg.StrongConsistency, d.progress, log.With("component", "watcher"), m)
	d.repuller = newRepuller(dc, cli, cfg.EtcdPrefix, cfg.registryDomain, cfg.RepullPeriod, log.With("component", "repuller"))
	d.failures = newFailLimiter()
	d.webhook = newWebhook(cli, cfg.EtcdPrefix, cfg.WebhookSecret, cfg.NodeName, d.failures, log.With("component", "webhook"), m)
	d.health = newHealthCache(d.checkHealth)
	d.claim = newNodeClaim(cli, cfg.EtcdPrefix, cfg.NodeName, cfg.Listen, log.With("component", "node"))
	return d, nil
}

func (d *daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(d.cfg.WebhookPath, d.webhook.dockerHub)
	mux.HandleFunc(d.cfg.RegistryWebhookPath, d.webhook.registry)
	mux.HandleFunc("/api/deploy", d.webhook.apiDeploy)
	mux.HandleFunc("/api/harbor/webhook", d.webhook.harbor)
	mux.HandleFunc("/api/github/webhook", d.webhook.gitHub)
	mux.HandleFunc("/api/quay/webhook", d.webhook.quay)
	mux.HandleFunc("GET /healthz", d.healthz)
	mux.HandleFunc("GET /api/status", d.requireSecret(d.apiStatus))
	mux.Handle("GET /metrics", d.metricsHandler())
	return mux
}

// GET /metrics: the webhook secret is needed unless -metrics_open.
func (d *daemon) metricsHandler() http.Handler {
	metrics := promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{})
	if d.cfg.MetricsOpen {
		return metrics
	}
	return d.requireSecret(metrics.ServeHTTP)
}

func (d *daemon) submit(ctx context.Context) func(deployEvent) {
	return func(ev deployEvent) {
		// The one place a trigger's repository is resolved: the queue
		// and the deploy get its canonical name.
		repo, err := resolveRepo(ev.Repo, d.cfg.registryDomain)
		if err != nil {
			d.log.Warn("ignoring trigger for an invalid repository", "repo", ev.Repo, "err", err)
			if ev.Rev != 0 {
				d.progress.done([]int64{ev.Rev})
			}
			return
		}
		ev.Repo = repo.Name()
		d.queue.submit(ctx, ev)
	}
}

func (d *daemon) run(ctx context.Context) error {
	var certs *certReloader
	if d.cfg.TLSCert != "" {
		var err error
		if certs, err = newCertReloader(d.cfg.TLSCert, d.cfg.TLSKey, d.log.With("component", "tls")); err != nil {
			return err
		}
	}
	for attempt := 1; ; attempt++ {
		err := d.claim.acquire(ctx)
		if err == nil {
			break
		}
		if errors.Is(err, errNodeNameTaken) {
			return fmt.Errorf("-node_name %s: %w", d.cfg.NodeName, err)
		}
		if ctx.Err() != nil {
			return nil // stopped while starting
		}
		d.log.Warn("cannot claim the node name in etcd yet", "err", err)
		if !sleepCtx(ctx, backoff(d.cfg.EtcdRetryDelay, attempt)) {
			return nil
		}
	}
	claimCtx, stopClaim := context.WithCancel(context.WithoutCancel(ctx))
	claimDone := make(chan struct{})
	go func() { d.claim.keep(claimCtx); close(claimDone) }()
	defer func() { stopClaim(); <-claimDone }()
	if err := d.resolveSecret(ctx); err != nil {
		if ctx.Err() != nil {
			return nil // stopped while starting
		}
		return err
	}
	ln, err := (&net.ListenConfig{}).Listen(ctx, "tcp", d.cfg.Listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	if certs != nil {
		ln = tls.NewListener(ln, certs.tlsConfig())
	}
	d.listener = ln
	close(d.ready)

	// Deploys run under workCtx, which outlives ctx by a bound so that a
	// stop in flight can finish; state writers run under bgCtx, which
	// ends last.
	workCtx, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	bgCtx, cancelBg := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelBg()

	d.watcher.emit = d.submit(workCtx)
	d.repuller.submit = d.submit(workCtx)

	srv := &http.Server{
		Handler: d.handler(),
		// Webhook senders post small bodies; slow clients must not hold
		// connections open.
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	var bg errgroup.Group
	bg.Go(func() error { return d.progress.run(bgCtx) })
	if d.slack != nil {
		bg.Go(func() error { return d.slack.run(bgCtx) })
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	// (parked.go) Put back or finish re-creates a crash interrupted,
	// before any trigger is acted on; bounded inside.
	d.recreator.recoverAtStart(gctx)
	g.Go(func() error { return d.watcher.run(gctx) })
	g.Go(func() error { return d.repuller.run(gctx) })
	g.Go(func() error { return d.status.run(gctx) })
	err = g.Wait()

	// Let deploys in flight finish their stops, within a bound. Failed
	// deploys waiting for a retry stop waiting: their triggers stay open.
	d.queue.stopRetries()
	drained := make(chan struct{})
	go func() { d.queue.wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(d.cfg.shutdownGrace):
		d.log.Warn("deploys still running at shutdown, cancelling them")
		cancelWork()
		<-drained
	}
	cancelWork()
	// Revoking the session lease frees our rollout slots at once; with
	// etcd unreachable the lease expires by itself (sessionTTL), so do not
	// wait for it longer than a moment.
	closed := make(chan struct{})
	go func() { d.rollout.close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		d.log.Warn("etcd session not revoked at shutdown; its lease will expire", "ttl_seconds", sessionTTL)
	}
	d.webhook.wg.Wait()
	cancelBg()
	if berr := bg.Wait(); err == nil {
		err = berr
	}
	d.log.Info("deployer stopped")
	return err
}

// startEmbeddedEtcd runs a single-member etcd in this process.
func startEmbeddedEtcd(cfg config, log *slog.Logger) (*embed.Etcd, error) {
	ec := embed.NewConfig()
	ec.Name = cfg.NodeName
	ec.Dir = cfg.EtcdDataDir
	cu, _ := url.Parse(cfg.EtcdListenClient)
	pu, _ := url.Parse(cfg.EtcdListenPeer)
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	// Trigger keys are rewritten forever; keep an hour of history.
	ec.AutoCompactionMode, ec.AutoCompactionRetention = "periodic", "1h"
	if err := os.MkdirAll(cfg.EtcdDataDir, 0o700); err != nil {
		return nil, fmt.Errorf("-etcd_data_dir: %w", err)
	}
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
		log.Info("embedded etcd ready", "client_url", cfg.EtcdListenClient, "data_dir", cfg.EtcdDataDir)
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-time.After(time.Minute):
		e.Close()
		return nil, errors.New("embedded etcd: not ready within a minute")
	}
}
