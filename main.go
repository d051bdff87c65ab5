// Command deployer is a per-node continuous-deployment daemon.
//
// A registry says a new image was pushed (a Docker Hub webhook or a
// registry notification); one deployer records the repository in etcd;
// the deployer on every node watches etcd, pulls the new version of every
// local tag of that repository and stops the containers that still run the
// old image, so that their supervisor (a systemd or fleet unit with
// Restart=always) starts them again on the new one. Slack is told.
//
// The files are layered: each uses only files of the layers before it
// (filedeps_test.go fails on a cycle, and lists every cross-file edge in
// filedeps.txt, so that a new one shows up in review):
//
//  1. leaves: errors (a deploy's outcomes), timeouts, names, etcd (the
//     keyspace), metrics, redact, flagcheck, selfid, lease, eventstream,
//     tlsreload, health
//  2. config, trigger (the record and the one rule), retry, scan, clone,
//     puller, upwait
//  3. the clients and the node: etcdclient, dockerclient, nodeid, auth,
//     parked, queue
//  4. restarter, watcher, webhook, cmd_secret
//  5. recreate, notify, repull, status, trigger_api
//  6. rollout, trigger_github, trigger_harbor, trigger_quay
//  7. replace, clusterview
//  8. ledger (the deploy ledger)
//  9. deploy, cmd_status, cmd_history
//  10. main: the daemon's wiring and lifecycle
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

// run is the whole daemon; it returns when ctx is done and everything has
// stopped.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "status" {
		return statusCommand(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "history" {
		return historyCommand(ctx, args[1:], stdout, stderr)
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
	log.Info("starting deployer", "version", version, "node", cfg.NodeName, "listen", cfg.Listen, "etcd_prefix", cfg.EtcdPrefix)
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

// stopBound is how long the daemon's stop takes at most, from the signal:
// the grace of deploys in flight (-kill_timeout + 2 s) and the queue's
// wait for those it cut (cutWait), then at once the lease's revocation
// (3 s), the last progress save (2 s) and Slack's flush (3 s); Docker
// Hub callbacks get what is left. -kill_timeout + 7 s.
func stopBound(cfg config) time.Duration {
	return cfg.shutdownGrace + cutWait + 4*time.Second
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
	eventAPI
	imageRemover
	PingWithContext(ctx context.Context) error
}

// daemon wires the components together.
type daemon struct {
	cfg       config
	log       *slog.Logger
	metrics   *metrics
	etcd      *clientv3.Client // confined to -etcd_prefix
	docker    dockerAPI
	webhook   *webhook
	watcher   *watcher
	progress  *progress
	queue     *deployQueue
	repuller  *repuller
	leases    *nodeLease
	recreator *recreator
	status    *statusReporter
	ledger    *ledger
	slack     *slackNotifier // nil when Slack is off
	failures  *failLimiter   // failed authentications per address
	health    *healthCache
	claim     *nodeClaim    // the node name, held while running
	stopBound time.Duration // from the signal to run's return
	listener  net.Listener  // set by run; tests read its address
	ready     chan struct{} // closed once listening
}

// newDaemon builds every component of the daemon on cli (an etcd client;
// the daemon sees only -etcd_prefix of it) and dc. It starts nothing.
func newDaemon(cfg config, cli *clientv3.Client, dc dockerAPI, log *slog.Logger) (*daemon, error) {
	m := newMetrics()
	etcd := inPrefix(cli, cfg.EtcdPrefix)
	d := &daemon{cfg: cfg, log: log, metrics: m, etcd: etcd, docker: dc, ready: make(chan struct{}), stopBound: stopBound(cfg)}
	var note notifier = nopNotifier{}
	if cfg.SlackWebhookURL != "" {
		d.slack = newSlackNotifier(cfg.SlackWebhookURL, cfg.SlackUsername, log.With("component", "slack"), m)
		note = d.slack
	}
	d.leases = newNodeLease(etcd, sessionTTL, callTimeout)

	// One source of Docker events for every subscription: each is a
	// stream of its own, closed when it ends (go-dockerclient's own
	// monitor leaves a goroutine and a connection behind per
	// subscription, eventstream.go).
	events := eventsFor(dc, callTimeout)
	rolloutLog := log.With("component", "rollout")
	wait := newUpWaiter(dc, events, cfg.RestartTimeout, callTimeout, rolloutLog, m)
	rs := newRestarter(dc, wait, cfg.killTimeout, selfContainerID(), log.With("component", "restarter"), m)
	d.recreator = newRecreator(dc, rs, wait, log.With("component", "recreate"), m)
	ro := newRollout(etcd, d.leases, cfg.NodeName, cfg.MaxUnavailable, cfg.SlotTimeout, callTimeout, rolloutLog, m)
	rep := newReplacer(ro, rs, d.recreator, cfg.RestartStrategy, rolloutLog)
	dep := newDeployer(newPuller(dc, cfg.DockerCfg, log.With("component", "puller"), m), rep, dc, note, cfg.NodeName, log.With("component", "deployer"), m)
	dep.dryRun, dep.cleanup = cfg.DryRun, cfg.Cleanup
	d.ledger = newLedger(etcd, dc, cfg.NodeName, cfg.History, cfg.MaxUnavailable > 0, m.reg, log.With("component", "ledger"))
	dep.ledger = d.ledger

	d.progress = newProgress(etcd, progressKey(cfg.NodeName), log.With("component", "progress"))
	d.queue = newDeployQueue(cfg.MaxThreads, cfg.shutdownGrace, func(ctx context.Context, j job) error {
		err := dep.deploy(ctx, j)
		d.status.poke() // the record shows the outcome at once
		return err
	}, d.progress.done, log.With("component", "queue"), m)
	d.status = newStatusReporter(dc, events, etcd, d.leases, cfg.NodeName, version, d.queue.pending, log.With("component", "status"))
	m.reg.MustRegister(newSkewCollector(etcd))

	d.watcher = newWatcher(etcd, cfg.NodeName, cfg.EtcdRetryDelay, !cfg.StrongConsistency, d.progress, d.submit, log.With("component", "watcher"), m)
	d.repuller = newRepuller(dc, etcd, cfg.registryDomain, cfg.RepullPeriod, d.submit, log.With("component", "repuller"))
	d.failures = newFailLimiter()
	d.webhook = newWebhook(etcd, cfg.EtcdPrefix, cfg.WebhookSecret, cfg.NodeName, d.failures, log.With("component", "webhook"), m)
	d.health = newHealthCache(healthChecks(etcd, progressKey(cfg.NodeName), dc))
	d.claim = newNodeClaim(etcd, cfg.NodeName, cfg.Listen, log.With("component", "node"))
	return d, nil
}

// handler serves the two paths the flags name and every route of
// builtinRoutes (config.go), which validate keeps the flags from naming.
func (d *daemon) handler() http.Handler {
	handlers := map[string]http.Handler{
		"/api/deploy":         http.HandlerFunc(d.webhook.apiDeploy),
		"/api/harbor/webhook": http.HandlerFunc(d.webhook.harbor),
		"/api/github/webhook": http.HandlerFunc(d.webhook.gitHub),
		"/api/quay/webhook":   http.HandlerFunc(d.webhook.quay),
		"GET /healthz":        d.health,
		"GET /api/status":     d.requireSecret(statusHandler(d.etcd)),
		"GET /api/history":    d.requireSecret(historyHandler(d.etcd)),
		"GET /metrics":        d.metricsHandler(),
	}
	mux := http.NewServeMux()
	mux.HandleFunc(d.cfg.WebhookPath, d.webhook.dockerHub)
	mux.HandleFunc(d.cfg.RegistryWebhookPath, d.webhook.registry)
	for _, pattern := range builtinRoutes {
		h, ok := handlers[pattern]
		if !ok || len(handlers) != len(builtinRoutes) {
			panic("builtinRoutes and the handlers differ at " + pattern)
		}
		mux.Handle(pattern, h)
	}
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

// submit queues a deploy event from the watcher or the periodic re-pull.
// It is the one place a trigger's repository is resolved: the queue and
// the deploy get its canonical name.
func (d *daemon) submit(ev deployEvent) {
	repo, err := resolveRepo(ev.Repo, d.cfg.registryDomain)
	if err != nil {
		d.log.Warn("ignoring trigger for an invalid repository", "repo", ev.Repo, "err", err)
		if ev.Rev != 0 {
			d.progress.done([]int64{ev.Rev})
		}
		return
	}
	ev.Repo = repo.Name()
	d.queue.submit(ev)
}

// run serves until ctx is done, then stops in order: the HTTP server, the
// watcher, the re-pull and the status reporter at once, and the queue
// once its deploys in flight have finished (within -shutdown_grace);
// then the node's lease is revoked, and the state writers (progress,
// Slack) flush last.
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
	secret, err := resolveSecret(ctx, d.etcd, d.cfg, d.log)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped while starting
		}
		return err
	}
	d.cfg.WebhookSecret, d.webhook.secret = secret, secret
	ln, err := (&net.ListenConfig{}).Listen(ctx, "tcp", d.cfg.Listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	if certs != nil {
		ln = tls.NewListener(ln, certs.tlsConfig())
	}
	d.listener = ln
	close(d.ready)

	// The state writers run under bgCtx, which ends last: the progress
	// of the last deploys is saved and Slack hears of them.
	bgCtx, cancelBg := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelBg()
	var bg errgroup.Group
	bg.Go(func() error { return d.progress.run(bgCtx) })
	bg.Go(func() error { return d.ledger.run(bgCtx) })
	if d.slack != nil {
		bg.Go(func() error { return d.slack.run(bgCtx) })
	}

	srv := &http.Server{
		Handler: d.handler(),
		// Webhook senders post small bodies; slow clients must not hold
		// connections open.
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	// The stop's bound (-kill_timeout + 7 s) counts from the signal.
	began := make(chan time.Time, 1)
	defer context.AfterFunc(ctx, func() { began <- time.Now() })()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		// No longer than the queue's stop: handlers' etcd writes have
		// their own deadline.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), min(5*time.Second, d.cfg.shutdownGrace+cutWait))
		defer cancel()
		return srv.Shutdown(sctx)
	})
	g.Go(func() error { return d.queue.run(gctx) })
	// (parked.go) Put back or finish re-creates a crash interrupted,
	// before any trigger is acted on; bounded inside.
	d.recreator.recoverAtStart(gctx)
	g.Go(func() error { return d.watcher.run(gctx) })
	g.Go(func() error { return d.repuller.run(gctx) })
	g.Go(func() error { return d.status.run(gctx) })
	err = g.Wait()
	stopBy := time.Now()
	select {
	case stopBy = <-began:
	default: // a component failed: the stop begins now
	}
	stopBy = stopBy.Add(d.stopBound)

	// No deploy runs any more. At once, each bounded inside: the state
	// writers save the handled revision (2 s) and flush Slack (3 s), and
	// revoking the lease frees our rollout slots and status record (3 s;
	// otherwise it expires).
	cancelBg()
	if lerr := d.leases.Close(); lerr != nil {
		d.log.Warn("etcd session not revoked at shutdown", "err", lerr)
	}
	if berr := bg.Wait(); err == nil {
		err = berr
	}
	// Progress is saved: Docker Hub callbacks in flight get what is left
	// of the stop's bound.
	cctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), stopBy)
	defer cancel()
	d.webhook.Shutdown(cctx)
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

// eventsFor returns the event source for every subscription on dc:
// dockerEvents for a real client, dc itself otherwise (the tests' fake).
func eventsFor(dc dockerAPI, callTimeout time.Duration) eventAPI {
	if c, ok := dc.(*dockerClient); ok {
		return newDockerEvents(c.Client, callTimeout)
	}
	return dc
}

// requireSecret wraps a handler that needs the webhook secret.
func (d *daemon) requireSecret(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if authorized(r, d.cfg.WebhookSecret) {
			next(w, r)
			return
		}
		code, err := rejectUnauthorized(w, r, d.failures)
		writeJSON(w, code, map[string]string{"error": err.Error()})
	}
}
