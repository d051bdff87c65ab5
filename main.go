// Command deployer is a per-node continuous-deployment daemon.
//
// A registry says a new image was pushed (a Docker Hub webhook or a
// registry notification); one deployer records the repository in etcd;
// the deployer on every node watches etcd, pulls the new version of every
// local tag of that repository and stops the containers that still run the
// old image, so that their supervisor (a systemd or fleet unit with
// Restart=always) starts them again on the new one. One node tells Slack
// and the -notify services once per rollout.
//
// The files are layered: each uses only files of the layers before it
// (filedeps_test.go fails on a cycle, and lists every cross-file edge in
// filedeps.txt, so that a new one shows up in review):
//
//  1. leaves: errors (a deploy's outcomes), timeouts, names, etcd (the
//     keyspace), metrics, redact, flagcheck, eventstream, tlsreload,
//     health, leftalone (the containers deploys pass over), window
//     (deploy windows)
//  2. config (and the etcd and Docker clients as the flags say),
//     config_notify (the notification flags), trigger (the record and
//     the one rule), retry, scan, clone, puller, upwait, policy (a tag's
//     rollout policy), haltmove (halt records moved from their legacy
//     key at start)
//  3. the node: nodeid, auth, parked, queue; freeze (the freeze and
//     waiting records)
//  4. restarter, watcher, webhook, cmd_secret, dashboard_auth (the
//     dashboard's sessions)
//  5. recreate, notify, repull, status, trigger_api
//  6. rollout, trigger_github, trigger_harbor, trigger_quay,
//     notify_services (the Slack webhook and the -notify services),
//     notify_slackthread (Slack's Web API with -slack_token)
//  7. replace, canary (canary nodes, the bake, promote and abort)
//  8. ledger (the deploy ledger), then hold (freezes and windows hold a
//     version), holdops and tagpolicy
//  9. pinrecord (a tag's pin), quarantine (read from the ledger)
//  10. gate (may this version replace containers here: pins and the
//     quarantine), tagstate (each tag's deploy state in the cluster view)
//  11. deploy, clusterview, cmd_status, cmd_history, cmd_policy,
//     policy_api, rolloutreport (one report per rollout, its sender
//     chosen through etcd), dashboard_view (what the dashboard shows)
//  12. rollback (an earlier version back under its tag, or a pin)
//  13. pin (deployer pin and unpin, POST /api/pin and /api/unpin),
//     haltrollback (a halted version rolled back)
//  14. cmd_rollback, cmd_pin, cmd_canary, autorollback (a halt rolled
//     back by itself), dashboard (the web dashboard)
//  15. main: the daemon's wiring and lifecycle
//
// Infrastructure that knows nothing of deploys is in packages of its own
// under internal/, which package main imports and which import nothing of
// it: etcdc (the etcd client with its TLS, its leases, the view of a
// prefix, and DueLoop: a loop that sleeps until something is due or its
// keys change), dockerc (the Docker client with API negotiation, and the event
// stream), backoff (the waits of every retry loop), pemfile (a key pair
// and a CA pool read again when their files change) and selfid (the ID of
// our own container).
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
	_ "unsafe" // go:linkname

	"github.com/prometheus/client_golang/prometheus/promhttp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/die-net/deployer/internal/backoff"
	"github.com/die-net/deployer/internal/dockerc"
	"github.com/die-net/deployer/internal/etcdc"
	"github.com/die-net/deployer/internal/selfid"
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
	if len(args) > 0 && args[0] == "secret" {
		return secretCommand(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "history" {
		return historyCommand(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "rollback" {
		return rollbackCommand(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && (args[0] == "pin" || args[0] == "unpin") {
		return pinCommand(ctx, args[1:], args[0] == "unpin", stdout, stderr)
	}
	if cmd, ok := policyCommands[firstArg(args)]; ok {
		return cmd(ctx, args[1:], stdout, stderr)
	}
	if len(args) > 0 && (args[0] == "promote" || args[0] == "abort") {
		return canaryCommand(ctx, args[0], args[1:], stdout, stderr)
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
	var cli *clientv3.Client
	if len(cfg.EtcdNodes) == 0 {
		etcd, err := startEmbeddedEtcd(cfg, log)
		if err != nil {
			return err
		}
		defer closeWithin(etcd.Close, 10*time.Second, log)
		// The daemon talks to its own member in process: no gRPC
		// connection, no keepalive pings. The client URL still serves
		// the subcommands.
		cli = v3client.New(etcd.Server)
	} else {
		var err error
		cli, err = newEtcdClient(ctx, cfg, log)
		if err != nil {
			return err
		}
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
	gateAPI
	tagAPI
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
	leases    *etcdc.NodeLease
	parker    *parker // settles what a crash left parked
	ledger    *ledger
	rollback  *rollbacker
	autoRb    *autoRollback // nil: -auto_rollback off, or no halts (-max_unavailable=0)
	policies  *policies     // the rollout policies (policy.go)
	holds     *holds        // freezes and windows (hold.go)
	policyAPI *policyAPI
	canaries  *canaries // canary rollouts: the hold, the bake, promote and abort
	status    *statusReporter
	notify    *notifyHub       // nil when no service is configured
	reports   *rolloutReporter // nil when no service is configured
	failures  *failLimiter     // failed authentications per address
	secret    *secretCell      // the webhook secret, set once at start
	health    *healthCache
	dash      *dashboard
	claim     *nodeClaim    // the node name, held while running
	stopBound time.Duration // from the signal to run's return
	listener  net.Listener  // set by run; tests read its address
	ready     chan struct{} // closed once listening
}

// newDaemon builds every component of the daemon on cli (an etcd client;
// the daemon sees only -etcd_prefix of it) and dc. It starts nothing.
func newDaemon(cfg config, cli *clientv3.Client, dc dockerAPI, log *slog.Logger) (*daemon, error) {
	m := newMetrics()
	etcd := etcdc.InPrefix(cli, cfg.EtcdPrefix)
	d := &daemon{cfg: cfg, log: log, metrics: m, etcd: etcd, docker: dc, secret: &secretCell{}, ready: make(chan struct{}), stopBound: stopBound(cfg)}
	d.leases = etcdc.NewNodeLease(etcd, sessionTTL, callTimeout)
	var note notifier = nopNotifier{}
	senders, err := notifySenders(cfg, log.With("component", "notify"))
	if err != nil {
		return nil, err
	}
	var threads threadPoster
	if cfg.SlackToken != "" {
		threads = newSlackThreads(cfg.SlackToken, cfg.SlackChannel, cfg.SlackUsername, cfg.SlackAPI)
	}
	if len(senders) > 0 || threads != nil {
		d.notify = newNotifyHub(senders, cfg.NotifyPerNode, log.With("component", "notify"), m)
		note = d.notify
		d.reports = newRolloutReporter(etcd, d.leases, d.notify, threads, cfg.NodeName, log.With("component", "reports"))
	}

	// One source of Docker events for every subscription: each is a
	// stream of its own, closed when it ends (go-dockerclient's own
	// monitor leaves a goroutine and a connection behind per
	// subscription, internal/dockerc/events.go).
	events := eventsFor(dc, callTimeout)
	rep := newReplacement(dc, events, etcd, d.leases, replacementOptions{
		node: cfg.NodeName, strategy: cfg.RestartStrategy, maxUnavailable: cfg.MaxUnavailable.N,
		restartTimeout: cfg.RestartTimeout, killTimeout: cfg.killTimeout, slotTimeout: cfg.SlotTimeout,
		callTimeout: callTimeout, selfID: selfid.ContainerID(),
	}, log, m)
	d.parker = rep.parker
	d.ledger = newLedger(etcd, dc, cfg.NodeName, cfg.History, cfg.MaxUnavailable.coordinated(), m.reg, log.With("component", "ledger"))
	d.rollback = newRollbacker(etcd, cfg.DockerCfg, cfg.registryDomain, cfg.History, log)
	if cfg.AutoRollback && cfg.MaxUnavailable.coordinated() {
		d.autoRb = newAutoRollback(etcd, d.leases, d.rollback, d.ledger, cfg.NodeName, log.With("component", "autorollback"))
	}
	dep := newDeployer(newPuller(dc, cfg.DockerCfg, log.With("component", "puller"), m), rep.replacer, dc, note, cfg.NodeName,
		deployOptions{dryRun: cfg.DryRun, cleanup: cfg.Cleanup, keepImages: cfg.KeepImages}, d.ledger, log.With("component", "deployer"), m)
	dep.gate = newGate(etcd, dc, cfg.DockerCfg, d.ledger, log.With("component", "gate"))
	d.policies = newPolicies(etcd, basePolicy(cfg.MaxUnavailable, cfg.UpAfter))
	d.holds = newHolds(etcd, d.policies, d.ledger, dc, cfg.NodeName, log.With("component", "holds"))
	dep.policies, dep.holds = d.policies, d.holds
	rep.replacer.gate = d.holds.gate
	var ann announcer = nopAnnouncer{}
	if d.notify != nil {
		ann = d.notify
	}
	d.canaries = newCanaries(etcd, d.policies, dc, cfg.NodeName, cfg.NodeLabels, ann, rollbackHalted(d.rollback, cfg.NodeName), cfg.registryDomain,
		log.With("component", "canary"))
	dep.canaries = d.canaries

	d.progress = newProgress(etcd, progressKey(cfg.NodeName), log.With("component", "progress"))
	statusPokes := make(chan struct{}, 1) // a deploy ended: the status record shows its outcome at once
	d.queue = newDeployQueue(cfg.MaxThreads, cfg.shutdownGrace, func(ctx context.Context, j job) error {
		err := dep.deploy(ctx, j)
		backoff.Wake(statusPokes)
		return err
	}, d.progress.done, log.With("component", "queue"), m)
	d.status = newStatusReporter(dc, events, etcd, d.leases, cfg.NodeName, version, d.queue.pending, statusPokes, log.With("component", "status"))
	d.status.leftAlone = rep.leftAlone.list // (leftalone.go) shown in the status record; written after every deploy
	d.status.strategy = cfg.RestartStrategy
	d.status.labels, d.status.ahead, d.holds.changed = cfg.NodeLabels, d.holds.ahead, d.status.poke
	m.reg.MustRegister(newSkewCollector(etcd))

	d.watcher = newWatcher(etcd, cfg.NodeName, cfg.EtcdRetryDelay, !cfg.StrongConsistency, d.progress, d.submit, log.With("component", "watcher"), m)
	d.repuller = newRepuller(dc, etcd, cfg.registryDomain, cfg.RepullPeriod, d.submit, log.With("component", "repuller"))
	d.failures = newFailLimiter()
	d.webhook = newWebhook(etcd, cfg.EtcdPrefix, d.secret.get, cfg.NodeName, d.failures, log.With("component", "webhook"), m)
	d.policyAPI = &policyAPI{h: d.webhook, policies: d.policies, registryDomain: cfg.registryDomain, node: cfg.NodeName,
		ops: newHoldOps(etcd, d.policies.base, cfg.registryDomain, log.With("component", "holds"))}
	d.webhook.deployNow = d.policyAPI.deployNow
	d.health = newHealthCache(healthChecks(etcd, progressKey(cfg.NodeName), dc))
	// The dashboard tells "rolling out" from "waiting for a slot" by the
	// slots a tag holds against the flag's count (a percentage: against 1).
	dashSlots := cfg.MaxUnavailable.N
	if cfg.MaxUnavailable.Percent {
		dashSlots = 1
	}
	d.dash = newDashboard(etcd, d.secret.get, d.failures, dashOps{
		rollback: d.rollback, pins: newPinner(etcd, cfg.registryDomain, cfg.History), canaries: d.canaries, holds: d.policyAPI.ops, say: d.say,
	}, cfg.NodeName, dashSlots, log.With("component", "dashboard"))
	d.claim = newNodeClaim(etcd, cfg.NodeName, cfg.Listen, cfg.EtcdRetryDelay, log.With("component", "node"))
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
		"/api/rollback":       rollbackHandler(d.webhook, d.rollback, d.cfg.NodeName, d.say),
		"/api/pin":            pinHandler(d.webhook, newPinner(d.etcd, d.cfg.registryDomain, d.cfg.History), d.cfg.NodeName, false, d.say),
		"/api/unpin":          pinHandler(d.webhook, newPinner(d.etcd, d.cfg.registryDomain, d.cfg.History), d.cfg.NodeName, true, d.say),
		"GET /metrics":        d.metricsHandler(),
		"GET /api/policy":     d.requireSecret(d.policyAPI.get),
		"PUT /api/policy":     http.HandlerFunc(d.policyAPI.put),
		"/api/freeze":         http.HandlerFunc(d.policyAPI.freeze),
		"/api/thaw":           http.HandlerFunc(d.policyAPI.thaw),
		"/api/promote":        canaryHandler(d.webhook, d.canaries, "promote"),
		"/api/abort":          canaryHandler(d.webhook, d.canaries, "abort"),
		"GET /{$}":            d.dash.index(),
		"/ui/":                d.dash.handler(),
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

// say posts a message of the fleet's (a rollback, a pin) on every
// notification service, when one is on.
func (d *daemon) say(text string) {
	if d.notify != nil {
		d.notify.say(text)
	}
}

// GET /metrics: the webhook secret is needed unless -metrics_open.
func (d *daemon) metricsHandler() http.Handler {
	metrics := promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{})
	if d.cfg.MetricsOpen {
		return metrics
	}
	return d.requireSecret(metrics.ServeHTTP)
}

// submit queues a deploy event from the watcher or the periodic re-pull
// for repository name as they found it. It is the one place a trigger's
// repository is resolved: the event, the queue's job and the deploy carry
// the reference.Named.
func (d *daemon) submit(name string, ev deployEvent) {
	repo, err := resolveRepo(name, d.cfg.registryDomain)
	if err != nil {
		d.log.Warn("ignoring trigger for an invalid repository", "repo", name, "err", err)
		if ev.Rev != 0 {
			d.progress.done([]int64{ev.Rev})
		}
		return
	}
	ev.Repo = repo
	d.queue.submit(ev)
}

// run starts the daemon (claims the node name, resolves the webhook
// secret, listens) and serves until ctx is done; then the groups stop in
// order. Front, at once: the HTTP server, the watcher, the re-pull, the
// status reporter and the parker's settle of leftovers. Work: the queue,
// once its deploys in flight have finished (within -shutdown_grace).
// Back, last and each bounded inside: the progress save and Slack's
// flush, while the node's lease is revoked. Docker Hub callbacks get what
// is left of the stop's bound (stopBound), and the node name is released.
func (d *daemon) run(ctx context.Context) error {
	ln, release, err := d.start(ctx)
	if ln == nil {
		return err // cannot start, or stopped while starting
	}
	defer release()

	// Back: the state writers run under bgCtx, which ends last, so that
	// the progress of the last deploys is saved and Slack hears of them.
	bgCtx, cancelBg := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelBg()
	var back errgroup.Group
	back.Go(func() error { return d.progress.run(bgCtx) })
	back.Go(func() error { return d.ledger.run(bgCtx) })
	if d.notify != nil {
		back.Go(func() error { return d.notify.run(bgCtx) })
	}

	// The stop's bound (-kill_timeout + 7 s) counts from the signal.
	began := make(chan time.Time, 1)
	defer context.AfterFunc(ctx, func() { began <- time.Now() })()
	parked, err := d.serve(ctx, ln)
	stopBy := time.Now()
	select {
	case stopBy = <-began:
	default: // a component failed: the stop begins now
	}
	stopBy = stopBy.Add(d.stopBound)

	// Back. No deploy runs any more. At once, each bounded inside: the
	// state writers save the handled revision (2 s) and flush Slack (3 s),
	// and revoking the lease frees our rollout slots and status record
	// (3 s; otherwise it expires).
	cancelBg()
	if lerr := d.leases.Close(); lerr != nil {
		d.log.Warn("etcd session not revoked at shutdown", "err", lerr)
	}
	if berr := back.Wait(); err == nil {
		err = berr
	}
	// Progress is saved: Docker Hub callbacks in flight, and a put-back,
	// get what is left of the stop's bound.
	cctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), stopBy)
	defer cancel()
	d.webhook.Shutdown(cctx)
	select {
	case <-parked:
	case <-cctx.Done():
		d.log.Warn("gave up waiting for a parked container's put-back; the next start settles it")
	}
	d.log.Info("deployer stopped")
	return err
}

// start claims the node name, resolves the webhook secret and listens.
// ln is nil when the daemon cannot start (err says why) or ctx ended
// first (err is nil); otherwise release gives the node name up.
func (d *daemon) start(ctx context.Context) (ln net.Listener, release func(), err error) {
	var certs *certReloader
	if d.cfg.TLSCert != "" {
		if certs, err = newCertReloader(d.cfg.TLSCert, d.cfg.TLSKey, d.log.With("component", "tls")); err != nil {
			return nil, nil, err
		}
	}
	release, err = d.claimNode(ctx)
	if release == nil {
		return nil, nil, err // the name is taken, or stopped while starting
	}
	secret, err := resolveSecret(ctx, d.etcd, d.cfg, d.log)
	if err != nil {
		release()
		if ctx.Err() != nil {
			return nil, nil, nil // stopped while starting
		}
		return nil, nil, err
	}
	d.secret.set(secret)
	// Halt records an earlier version left at their legacy key move to
	// their new one (haltmove.go) here: etcd has just answered, and
	// nothing that reads a halt (a deploy's slot transactions, the
	// auto-rollback, the status view behind the listener) runs yet.
	moveHaltsAtStart(ctx, d.etcd, d.cfg.EtcdRetryDelay, d.log.With("component", "halts"))
	ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp", d.cfg.Listen)
	if err != nil {
		release()
		return nil, nil, fmt.Errorf("-listen: %w", err)
	}
	if certs != nil {
		ln = tls.NewListener(ln, certs.tlsConfig())
	}
	d.listener = ln
	close(d.ready)
	return ln, release, nil
}

// serve runs the front (the HTTP server on ln, the watcher, the re-pull,
// the status reporter, the auto-rollback, the parker) and the work (the
// queue) until ctx is done or one of them fails, and the queue has
// stopped. parked is closed when the parker has returned.
func (d *daemon) serve(ctx context.Context, ln net.Listener) (parked <-chan struct{}, err error) {
	g, gctx := errgroup.WithContext(ctx)
	// Front.
	srv := d.httpServer()
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
	// Work.
	g.Go(func() error { return d.queue.run(gctx) })
	// The parker puts back or finishes the re-creates a crash
	// interrupted before any trigger is acted on (bounded inside), then
	// settles leftovers until the signal. A put-back in flight then is
	// waited for within the stop's bound, as the Docker Hub callbacks.
	done := make(chan struct{})
	go func() { _ = d.parker.run(gctx); close(done) }()
	select {
	case <-d.parker.recovered:
	case <-gctx.Done():
	}
	g.Go(func() error { return d.watcher.run(gctx) })
	g.Go(func() error { return d.repuller.run(gctx) })
	g.Go(func() error { return d.status.run(gctx) })
	if d.autoRb != nil {
		g.Go(func() error { return d.autoRb.run(gctx) })
	}
	g.Go(func() error { return d.holds.run(gctx) })
	g.Go(func() error { return d.canaries.run(gctx) })
	if d.reports != nil {
		g.Go(func() error { return d.reports.run(gctx) })
	}
	return done, g.Wait()
}

// claimNode takes the node name, retrying while etcd does not answer, and
// keeps it until release is called. release is nil when the name is
// taken (err says so) or ctx ended first (err is nil).
func (d *daemon) claimNode(ctx context.Context) (release func(), err error) {
	// The claim outlives ctx: it is released when run returns.
	claimCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	held, done := make(chan struct{}), make(chan struct{})
	var claimErr error
	go func() { claimErr = d.claim.run(claimCtx, held); close(done) }()
	release = func() { stop(); <-done }
	select {
	case <-held:
		return release, nil
	case <-done:
		stop()
		if claimErr != nil {
			return nil, fmt.Errorf("-node_name %s: %w", d.cfg.NodeName, claimErr)
		}
		return nil, nil
	case <-ctx.Done():
		release()
		return nil, nil // stopped while starting
	}
}

// httpServer serves the daemon's handler.
func (d *daemon) httpServer() *http.Server {
	srv := &http.Server{
		Handler: d.handler(),
		// Webhook senders post small bodies; slow clients must not hold
		// connections open.
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	srv.RegisterOnShutdown(d.dash.close) // the dashboard's event streams end
	return srv
}

// etcdWatchResync is how often an etcd server's watch store catches up
// the watchers that are behind its revision (a watch from an earlier
// revision, a slow reader): mvcc.watchResyncPeriod, a variable etcd sets
// to 100 ms and offers no setting for. It ticks whether or not a watcher
// is behind: on an idle one-machine install, ten wake-ups a second were
// a third of the daemon's CPU (BENCHMARKS.md, 5f). The only etcd server
// in this process is the embedded single member, where nothing is ever
// far behind: 500 ms. A watch that starts behind (the watcher resuming
// from its progress at start; a slot waiter's watch when a write came
// between its read and its watch) gets its first events within 500 ms
// instead of 100 ms; a watch that starts at the current revision is not
// delayed. (The link fails, loudly, if a later etcd renames the
// variable.)
//
//go:linkname etcdWatchResync go.etcd.io/etcd/server/v3/storage/mvcc.watchResyncPeriod
var etcdWatchResync time.Duration

func init() { etcdWatchResync = 500 * time.Millisecond }

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
	// A single member on this host has no peer to hear from: its raft
	// clock need not beat ten times a second. Idle, the member's timers
	// are all its cost (BENCHMARKS.md, "Idle cost of one machine"): the
	// heartbeat at 400 ms (a 2 s election timeout, the least etcd takes,
	// so the first start elects itself within 0.4-2 s; leases may be as
	// short as 2.8 s, ours are 10 s), the bolt commit every second (the
	// WAL is written and synced at every proposal, so a crash loses
	// nothing), and no downgrade check, which only a cluster's leader
	// needs. The mvcc store's watch resync is set above (etcdWatchResync);
	// the lessor's 500 ms loop is fixed in etcd.
	ec.TickMs, ec.ElectionMs = 400, 2000
	ec.BackendBatchInterval = time.Second
	ec.DowngradeCheckTime = time.Hour
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
// dockerc.Events for a real client, dc itself otherwise (the tests' fake).
func eventsFor(dc dockerAPI, callTimeout time.Duration) eventAPI {
	if c, ok := dc.(*dockerc.Client); ok {
		return dockerc.NewEvents(c.Client, callTimeout)
	}
	return dc
}

// requireSecret wraps a handler that needs the webhook secret.
func (d *daemon) requireSecret(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if authorized(r, d.secret.get()) {
			next(w, r)
			return
		}
		code, err := rejectUnauthorized(w, r, d.failures)
		writeJSON(w, code, map[string]string{"error": err.Error()})
	}
}
