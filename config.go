package main

// config.go: the daemon's configuration: its flags with their defaults
// and environment fallbacks, parsed and validated once.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/dockerc"
	"github.com/die-net/deployer/internal/etcdc"
)

// errInvalidFlag marks every validation failure, so callers (and tests) can
// tell a bad command line from a failure to start.
var errInvalidFlag = errors.New("invalid flag")

// badFlag is the error of a flag that fails validation: errInvalidFlag,
// naming the flag.
func badFlag(flagName, format string, args ...any) error {
	return fmt.Errorf("%w -%s: %s", errInvalidFlag, flagName, fmt.Sprintf(format, args...))
}

// config is everything the command line says. The original's flags keep
// their names and defaults; the rest are new and documented in the README.
type config struct {
	// Flags of the original deployer.
	Docker            string
	DockerCfg         string
	EtcdDialTimeout   time.Duration
	EtcdNodes         []string // empty: run an embedded etcd
	EtcdPrefix        string
	EtcdRetryDelay    time.Duration
	KillTimeout       int // seconds
	Listen            string
	MaxThreads        int
	Registry          string
	RepullPeriod      time.Duration
	SlackUsername     string
	SlackWebhookURL   string
	StrongConsistency bool
	WebhookPath       string

	// New flags.
	NodeName            string
	WebhookSecret       string
	RegistryWebhookPath string
	EtcdDataDir         string
	EtcdListenClient    string
	EtcdListenPeer      string
	LogFormat           string
	MaxUnavailable      unavailable // a count or a percentage (policy.go); seeds the default policy
	UpAfter             time.Duration
	NodeLabels          []string // -node_labels: canary sets name them (policy.go)
	RestartTimeout      time.Duration
	SlotTimeout         time.Duration
	RestartStrategy     string
	MetricsOpen         bool
	DryRun              bool
	Cleanup             bool
	History             int    // versions of each tag the deploy ledger keeps (ledger.go)
	AutoRollback        bool   // a halt rolls its tag back by itself (autorollback.go)
	KeepImages          int    // with Cleanup: the images of the last N versions of each tag stay
	TLSCert             string // with TLSKey: serve the webhooks over HTTPS
	TLSKey              string
	notifyConfig        // -notify, -notify_per_node, -slack_token (config_notify.go)

	// TLS and authentication to etcd (internal/etcdc) and Docker
	// (internal/dockerc).
	EtcdCACert       string
	EtcdCert         string
	EtcdKey          string
	EtcdUsername     string
	EtcdPasswordFile string
	EtcdPassword     string // from $DEPLOYER_ETCD_PASSWORD, never a flag
	DockerTLSVerify  bool   // $DOCKER_TLS_VERIFY
	DockerCertPath   string // $DOCKER_CERT_PATH, else ~/.docker

	// Derived from the flags above by parseFlags, once.
	registryDomain string        // -registry's domain ("docker.io", "host:5000"): where bare names live
	killTimeout    time.Duration // -kill_timeout
	shutdownGrace  time.Duration // how long a stop waits for deploys in flight: killTimeout + 2 s
}

// defaultConfig returns the defaults, taking the environment from getenv.
func defaultConfig(getenv func(string) string) config {
	home := getenv("HOME")
	hostname, _ := os.Hostname()
	docker := "unix:///var/run/docker.sock"
	if h := getenv("DOCKER_HOST"); h != "" {
		docker = h
	}
	return config{
		Docker:              docker,
		DockerCfg:           home + "/.dockercfg",
		EtcdDialTimeout:     5 * time.Second,
		EtcdNodes:           nil, // the embedded etcd
		EtcdPrefix:          "/deployer",
		EtcdRetryDelay:      2 * time.Second,
		KillTimeout:         10,
		Listen:              ":4500",
		MaxThreads:          4,
		Registry:            "", // Docker Hub
		RepullPeriod:        24 * time.Hour,
		SlackUsername:       "Deployer",
		SlackWebhookURL:     getenv("SLACK_WEBHOOK_URL"),
		notifyConfig:        notifyConfig{SlackToken: getenv("SLACK_TOKEN"), SlackAPI: "https://slack.com/api/"},
		WebhookPath:         "/api/dockerhub/webhook",
		NodeName:            hostname,
		WebhookSecret:       getenv("DEPLOYER_WEBHOOK_SECRET"),
		RegistryWebhookPath: "/api/registry/webhook",
		EtcdDataDir:         "/var/lib/deployer/etcd",
		EtcdListenClient:    "http://127.0.0.1:4001",
		EtcdListenPeer:      "http://127.0.0.1:4002",
		LogFormat:           "text",
		MaxUnavailable:      unavailable{N: 1},
		UpAfter:             time.Second,
		History:             20,
		AutoRollback:        true,
		KeepImages:          2,
		RestartTimeout:      2 * time.Minute,
		SlotTimeout:         10 * time.Minute,
		RestartStrategy:     strategyStop,
		EtcdPassword:        getenv("DEPLOYER_ETCD_PASSWORD"),
		DockerTLSVerify:     getenv("DOCKER_TLS_VERIFY") != "",
		DockerCertPath:      dockerCertPath(getenv),
	}
}

// parseFlags parses args into a config. It returns flag.ErrHelp for -h, and
// an error wrapping errInvalidFlag for values that cannot work.
func parseFlags(name string, args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	b := bindFlags(name, getenv, stderr)
	fs := b.fs
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s [flags]\n       %s status [-json] [flags]\n       %s secret [flags]\n\nFlags:\n", name, name, name)
		fs.PrintDefaults()
	}
	if err := b.parse(args); err != nil {
		return *b.c, err
	}
	if fs.NArg() > 0 {
		return *b.c, fmt.Errorf("%w: unexpected argument %q", errInvalidFlag, fs.Arg(0))
	}
	return *b.c, b.c.validate()
}

// boundFlags is every flag of the daemon bound to a config: the one
// definition of the flags, which the daemon and its subcommands parse
// (`deployer secret` and `deployer status` take the daemon's command line).
type boundFlags struct {
	fs        *flag.FlagSet
	c         *config
	getenv    func(string) string
	etcdNodes string
	labels    string // -node_labels
	// The flags that default to secrets from the environment show no
	// default in -h: that would print the Slack token or the secret.
	envSlack, envSecret, envSlackToken string
}

// bindFlags defines the daemon's flags on a new flag set named name,
// with their defaults (defaultConfig) and help; it parses nothing.
func bindFlags(name string, getenv func(string) string, stderr io.Writer) *boundFlags {
	c := defaultConfig(getenv)
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	b := &boundFlags{fs: fs, c: &c, getenv: getenv, etcdNodes: strings.Join(c.EtcdNodes, ","), envSlack: c.SlackWebhookURL, envSecret: c.WebhookSecret, envSlackToken: c.SlackToken}
	c.SlackWebhookURL, c.WebhookSecret, c.SlackToken = "", "", ""

	fs.StringVar(&c.Docker, "docker", c.Docker, "Docker daemon endpoint (default from $DOCKER_HOST when set)")
	fs.StringVar(&c.DockerCfg, "dockercfg", c.DockerCfg, "registry credentials: a legacy .dockercfg or a docker config.json; empty for anonymous pulls")
	fs.DurationVar(&c.EtcdDialTimeout, "etcd_dial_timeout", c.EtcdDialTimeout, "timeout for connecting to etcd")
	fs.StringVar(&b.etcdNodes, "etcd_nodes", b.etcdNodes, "comma-separated etcd endpoints (the original's was http://127.0.0.1:4001); empty runs an embedded single-member etcd on loopback, its data in -etcd_data_dir")
	fs.StringVar(&c.EtcdPrefix, "etcd_prefix", c.EtcdPrefix, "etcd key prefix: starts with /, no trailing /")
	fs.DurationVar(&c.EtcdRetryDelay, "etcd_retry_delay", c.EtcdRetryDelay, "first delay before reconnecting to etcd (doubles up to 30x, with jitter)")
	fs.IntVar(&c.KillTimeout, "kill_timeout", c.KillTimeout, "seconds a container gets to stop before it is killed")
	fs.StringVar(&c.Listen, "listen", c.Listen, "HTTP listen address for the webhooks and /healthz")
	fs.IntVar(&c.MaxThreads, "max_threads", c.MaxThreads, "how many repositories are deployed at once")
	fs.StringVar(&c.Registry, "registry", c.Registry, "registry that bare repository names (myorg/foo) refer to; host[:port] or URL; empty means Docker Hub")
	fs.DurationVar(&c.RepullPeriod, "repull_period", c.RepullPeriod, "re-pull the tags of running containers this often, as a safety net, for repositories with a trigger key and containers labelled deployer.managed=true; 0 disables")
	fs.StringVar(&c.SlackUsername, "slack_username", c.SlackUsername, "Slack username to post as")
	fs.StringVar(&c.SlackWebhookURL, "slack_webhook_url", c.SlackWebhookURL, "Slack incoming webhook URL (default $SLACK_WEBHOOK_URL); empty disables Slack")
	fs.BoolVar(&c.StrongConsistency, "strong_consistency", c.StrongConsistency, "linearizable (quorum) etcd reads instead of serializable ones")
	fs.StringVar(&c.WebhookPath, "webhook_path", c.WebhookPath, "HTTP path of the Docker Hub webhook")

	fs.StringVar(&c.NodeName, "node_name", c.NodeName, "name of this node in Slack messages and etcd state (default: hostname)")
	fs.StringVar(&c.WebhookSecret, "webhook_secret", c.WebhookSecret, "secret webhooks must carry as 'Authorization: Bearer <secret>' or '?token=<secret>' (default $DEPLOYER_WEBHOOK_SECRET; empty: the cluster's secret kept in etcd, which 'deployer secret' prints)")
	fs.StringVar(&c.RegistryWebhookPath, "registry_webhook_path", c.RegistryWebhookPath, "HTTP path of the registry (CNCF distribution) notification endpoint")
	fs.StringVar(&c.EtcdDataDir, "etcd_data_dir", c.EtcdDataDir, "data directory of the embedded etcd (with -etcd_nodes empty)")
	fs.StringVar(&c.EtcdListenClient, "etcd_listen_client", c.EtcdListenClient, "client URL of the embedded etcd (with -etcd_nodes empty)")
	fs.StringVar(&c.EtcdListenPeer, "etcd_listen_peer", c.EtcdListenPeer, "peer URL of the embedded etcd (with -etcd_nodes empty)")
	fs.StringVar(&c.LogFormat, "log_format", c.LogFormat, "log format: text or json")
	fs.Var(&c.MaxUnavailable, "max_unavailable", "containers of one image tag that may be down at once across the cluster: a count, or a percentage of the tag's containers (25%); 0 restarts everything at once; seeds the default rollout policy (deployer policy)")
	fs.DurationVar(&c.UpAfter, "up_after", c.UpAfter, "how long a replacement without a health check must run, never restarted, before it counts as up; seeds the default rollout policy")
	fs.StringVar(&b.labels, "node_labels", "", "comma-separated labels of this node (canary,eu), reported in its status; a policy's canary_labels select nodes by them")
	fs.IntVar(&c.History, "history", c.History, "versions of each image tag the deploy ledger keeps in etcd (deployer history)")
	fs.DurationVar(&c.RestartTimeout, "restart_timeout", c.RestartTimeout, "how long a replacement may take to run (and be healthy) before the rollout halts")
	fs.DurationVar(&c.SlotTimeout, "slot_timeout", c.SlotTimeout, "how long a node waits for a rollout slot before it gives up and retries the deploy later")
	fs.BoolVar(&c.MetricsOpen, "metrics_open", c.MetricsOpen, "serve /metrics without the webhook secret (for scrapers on a trusted network)")
	fs.BoolVar(&c.DryRun, "dry_run", c.DryRun, "monitor only: pull and report stale containers (log, metrics, Slack), stop nothing")
	fs.BoolVar(&c.Cleanup, "cleanup", c.Cleanup, "after a successful deploy, remove the superseded image when no container uses it")
	fs.IntVar(&c.KeepImages, "keep_images", c.KeepImages, "with -cleanup: keep the images of the last N versions of each image tag, so that a rollback pulls nothing")
	fs.BoolVar(&c.AutoRollback, "auto_rollback", c.AutoRollback, "when a version's rollout halts, roll its tag back to the version that ran before (as deployer rollback does)")
	fs.StringVar(&c.TLSCert, "tls_cert", c.TLSCert, "PEM certificate (chain) file: serve the webhooks over HTTPS; re-read when it changes")
	fs.StringVar(&c.TLSKey, "tls_key", c.TLSKey, "PEM private key file of -tls_cert")
	fs.StringVar(&c.RestartStrategy, "restart_strategy", c.RestartStrategy, "stop (a supervisor re-creates the container) or recreate (the deployer does); label deployer.strategy overrides per container")
	addEtcdTLSFlags(fs, &c)
	addDockerTLSFlags(fs, &c)
	addNotifyFlags(fs, &c.notifyConfig)
	return b
}

// parse parses args and completes the config: the environment's secrets
// where no flag set them, the list of -etcd_nodes, a ~/ -dockercfg. It
// validates nothing and leaves arguments after the flags to the caller.
func (b *boundFlags) parse(args []string) error {
	if err := b.fs.Parse(args); err != nil {
		return err
	}
	c := b.c
	set := map[string]bool{}
	b.fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if !set["slack_webhook_url"] {
		c.SlackWebhookURL = b.envSlack
	}
	if !set["webhook_secret"] {
		c.WebhookSecret = b.envSecret
	}
	if !set["slack_token"] {
		c.SlackToken = b.envSlackToken
	}
	c.EtcdNodes = splitList(b.etcdNodes)
	c.NodeLabels = splitList(b.labels)
	if c.DockerCfg != "" && strings.HasPrefix(c.DockerCfg, "~/") {
		c.DockerCfg = filepath.Join(b.getenv("HOME"), c.DockerCfg[2:])
	}
	return nil
}

// splitList splits a comma-separated list, trimming spaces and dropping
// empty items (the original broke on "a, b").
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// validate checks the flags and derives their parsed forms
// (registryDomain, killTimeout, shutdownGrace).
func (c *config) validate() error {
	if c.Docker == "" {
		return badFlag("docker", "must not be empty")
	}
	if _, err := url.Parse(c.Docker); err != nil || !strings.Contains(c.Docker, "://") {
		return badFlag("docker", "%q is not an endpoint URL such as unix:///var/run/docker.sock", c.Docker)
	}
	if err := c.validateEtcd(); err != nil {
		return err
	}
	if c.EtcdRetryDelay <= 0 {
		return badFlag("etcd_retry_delay", "must be positive, got %s", c.EtcdRetryDelay)
	}
	if c.KillTimeout < 0 {
		return badFlag("kill_timeout", "must not be negative, got %d", c.KillTimeout)
	}
	c.killTimeout = time.Duration(c.KillTimeout) * time.Second
	c.shutdownGrace = c.killTimeout + drainMargin
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return badFlag("listen", "%q is not host:port: %v", c.Listen, err)
	}
	if c.MaxThreads < 1 {
		return badFlag("max_threads", "must be at least 1, got %d", c.MaxThreads)
	}
	domain, err := registryHost(c.Registry)
	if err != nil {
		return badFlag("registry", "%v", err)
	}
	c.registryDomain = domain
	if c.RepullPeriod < 0 {
		return badFlag("repull_period", "must not be negative, got %s (0 disables)", c.RepullPeriod)
	}
	if c.SlackWebhookURL != "" {
		if err := checkHTTPURL(c.SlackWebhookURL); err != nil {
			// Not the value: it holds Slack's token.
			return badFlag("slack_webhook_url", "is not an http(s) URL")
		}
	}
	if name, err := c.notifyConfig.validate(); err != nil {
		return badFlag(name, "%v", err)
	}
	if err := checkPlainPath(c.WebhookPath); err != nil {
		return badFlag("webhook_path", "%v", err)
	}
	if err := checkPlainPath(c.RegistryWebhookPath); err != nil {
		return badFlag("registry_webhook_path", "%v", err)
	}
	if c.RegistryWebhookPath == c.WebhookPath {
		return badFlag("registry_webhook_path", "must differ from -webhook_path")
	}
	if err := checkFreeRoute(c.WebhookPath); err != nil {
		return badFlag("webhook_path", "%v", err)
	}
	if err := checkFreeRoute(c.RegistryWebhookPath, c.WebhookPath); err != nil {
		return badFlag("registry_webhook_path", "%v", err)
	}
	if c.NodeName == "" || strings.ContainsAny(c.NodeName, "/ \t\n") {
		return badFlag("node_name", "%q must be non-empty, without spaces or /", c.NodeName)
	}
	if len(c.EtcdNodes) == 0 {
		if c.EtcdDataDir == "" {
			return badFlag("etcd_data_dir", "must not be empty when -etcd_nodes is empty")
		}
		if err := checkHTTPURL(c.EtcdListenPeer); err != nil {
			return badFlag("etcd_listen_peer", "%v", err)
		}
		if err := checkLoopbackURL(c.EtcdListenPeer); err != nil {
			return badFlag("etcd_listen_peer", "%v", err)
		}
	}
	if err := c.validateDockerTLS(); err != nil {
		return err
	}
	if c.UpAfter <= 0 {
		return badFlag("up_after", "must be positive, got %s", c.UpAfter)
	}
	for _, l := range c.NodeLabels {
		if strings.ContainsAny(l, "/ \t\n") {
			return badFlag("node_labels", "%q must be without spaces or /", l)
		}
	}
	if c.KeepImages < 1 {
		return badFlag("keep_images", "must be at least 1 (the version running), got %d", c.KeepImages)
	}
	if c.History < 1 {
		return badFlag("history", "must be at least 1, got %d", c.History)
	}
	if c.RestartTimeout <= 0 {
		return badFlag("restart_timeout", "must be positive, got %s", c.RestartTimeout)
	}
	if c.SlotTimeout <= 0 {
		return badFlag("slot_timeout", "must be positive, got %s", c.SlotTimeout)
	}
	if c.RestartStrategy != strategyStop && c.RestartStrategy != strategyRecr {
		return badFlag("restart_strategy", "%q must be stop or recreate", c.RestartStrategy)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return badFlag("tls_cert", "-tls_cert and -tls_key go together")
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return badFlag("log_format", "%q must be text or json", c.LogFormat)
	}
	return nil
}

// validateEtcd checks the flags that say how to reach etcd: the daemon's
// validate and its subcommands' (which take the daemon's command line and
// check only these) share it.
func (c *config) validateEtcd() error {
	if c.EtcdDialTimeout <= 0 {
		return badFlag("etcd_dial_timeout", "must be positive, got %s", c.EtcdDialTimeout)
	}
	for _, n := range c.EtcdNodes {
		if err := checkHTTPURL(n); err != nil {
			return badFlag("etcd_nodes", "%v", err)
		}
	}
	if !strings.HasPrefix(c.EtcdPrefix, "/") || strings.HasSuffix(c.EtcdPrefix, "/") || strings.Contains(c.EtcdPrefix, "//") {
		return badFlag("etcd_prefix", "%q must start with / and not end with /", c.EtcdPrefix)
	}
	if len(c.EtcdNodes) == 0 {
		// The embedded etcd: its client URL is where it is reached.
		if err := checkHTTPURL(c.EtcdListenClient); err != nil {
			return badFlag("etcd_listen_client", "%v", err)
		}
		if err := checkLoopbackURL(c.EtcdListenClient); err != nil {
			return badFlag("etcd_listen_client", "%v", err)
		}
	}
	return c.validateEtcdTLS()
}

func checkHTTPURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%q is not an http(s) URL", s)
	}
	return nil
}

const (
	strategyStop = "stop"
	strategyRecr = "recreate"
	strategySkip = "skip"
	strategyKey  = "deployer.strategy" // container label overriding -restart_strategy
)

// containerStrategy is how a container with labels is replaced: its
// deployer.strategy label, else def (-restart_strategy).
func containerStrategy(labels map[string]string, def string) string {
	switch s := labels[strategyKey]; s {
	case strategyStop, strategyRecr, strategySkip:
		return s
	}
	return def
}

var errUsage = errors.New("usage")

// addEtcdTLSFlags registers the etcd TLS and authentication flags, with
// the names etcdctl uses. Every command that talks to etcd calls it.
func addEtcdTLSFlags(fs *flag.FlagSet, c *config) {
	fs.StringVar(&c.EtcdCACert, "etcd_cacert", c.EtcdCACert, "PEM file of the CA(s) that sign the etcd servers' certificates; empty: the system's roots (for https:// -etcd_nodes)")
	fs.StringVar(&c.EtcdCert, "etcd_cert", c.EtcdCert, "PEM file of the client certificate for etcd (with -etcd_key); re-read when it changes")
	fs.StringVar(&c.EtcdKey, "etcd_key", c.EtcdKey, "PEM file of the private key of -etcd_cert; re-read when it changes")
	fs.StringVar(&c.EtcdUsername, "etcd_username", c.EtcdUsername, "etcd user; the password comes from $DEPLOYER_ETCD_PASSWORD or -etcd_password_file")
	fs.StringVar(&c.EtcdPasswordFile, "etcd_password_file", c.EtcdPasswordFile, "file holding the password of -etcd_username (a trailing newline is ignored)")
}

// validateEtcdTLS checks the etcd TLS and authentication flags.
func (c config) validateEtcdTLS() error {
	if (c.EtcdCert == "") != (c.EtcdKey == "") {
		return badFlag("etcd_cert", "-etcd_cert and -etcd_key go together")
	}
	tlsFlag := ""
	switch {
	case c.EtcdCACert != "":
		tlsFlag = "etcd_cacert"
	case c.EtcdCert != "":
		tlsFlag = "etcd_cert"
	}
	if tlsFlag != "" {
		if len(c.EtcdNodes) == 0 {
			return badFlag(tlsFlag, "applies to an external etcd (-etcd_nodes https://…); the embedded etcd listens on loopback without TLS")
		}
		for _, n := range c.EtcdNodes {
			if !strings.HasPrefix(n, "https://") {
				return badFlag(tlsFlag, "-etcd_nodes %q must be https:// to use TLS", n)
			}
		}
	}
	if c.EtcdPasswordFile != "" && c.EtcdPassword != "" {
		return badFlag("etcd_password_file", "set either -etcd_password_file or $DEPLOYER_ETCD_PASSWORD, not both")
	}
	if c.EtcdUsername == "" && (c.EtcdPasswordFile != "" || c.EtcdPassword != "") {
		return badFlag("etcd_username", "a password is set (-etcd_password_file or $DEPLOYER_ETCD_PASSWORD) but no -etcd_username")
	}
	if c.EtcdUsername != "" && c.EtcdPasswordFile == "" && c.EtcdPassword == "" {
		return badFlag("etcd_username", "needs a password: $DEPLOYER_ETCD_PASSWORD or -etcd_password_file")
	}
	return nil
}

// checkLoopbackURL refuses a listen URL that is reachable from other
// machines: the embedded etcd has neither TLS nor authentication, and
// whoever can write to it can trigger deploys.
func checkLoopbackURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q: %w", s, err)
	}
	host := u.Hostname()
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("%q is not a loopback address (127.0.0.1, [::1] or localhost): the embedded etcd has no TLS or authentication; run an external etcd for a cluster", s)
}

// etcdEndpoints is where the client connects: -etcd_nodes, or the
// embedded etcd's client URL.
func (c config) etcdEndpoints() []string {
	if len(c.EtcdNodes) > 0 {
		return c.EtcdNodes
	}
	return []string{c.EtcdListenClient}
}

// etcdPassword reads the password from -etcd_password_file or the
// environment.
func etcdPassword(cfg config) (string, error) {
	if cfg.EtcdPasswordFile == "" {
		return cfg.EtcdPassword, nil
	}
	b, err := os.ReadFile(cfg.EtcdPasswordFile)
	if err != nil {
		return "", fmt.Errorf("-etcd_password_file: %w", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("-etcd_password_file %s is empty", cfg.EtcdPasswordFile)
	}
	return pw, nil
}

// etcdOptions are the etcd client's settings, as the flags say.
func (c config) etcdOptions() (etcdc.Options, error) {
	o := etcdc.Options{
		Endpoints: c.etcdEndpoints(), DialTimeout: c.EtcdDialTimeout,
		CACert: c.EtcdCACert, Cert: c.EtcdCert, Key: c.EtcdKey,
	}
	if c.EtcdUsername != "" {
		pw, err := etcdPassword(c)
		if err != nil {
			return etcdc.Options{}, err
		}
		o.Username, o.Password = c.EtcdUsername, pw
	}
	return o, nil
}

// newEtcdClient connects to etcd as the flags say (etcdc.New).
func newEtcdClient(ctx context.Context, cfg config, log *slog.Logger) (*clientv3.Client, error) {
	opts, err := cfg.etcdOptions()
	if err != nil {
		return nil, err
	}
	return etcdc.New(ctx, opts, log)
}

// dockerCertPath is $DOCKER_CERT_PATH, else ~/.docker, as for the CLI.
func dockerCertPath(getenv func(string) string) string {
	if p := getenv("DOCKER_CERT_PATH"); p != "" {
		return p
	}
	if home := getenv("HOME"); home != "" {
		return filepath.Join(home, ".docker")
	}
	return ""
}

// addDockerTLSFlags registers the Docker TLS flags, named as the Docker
// CLI's and defaulting to its environment variables.
func addDockerTLSFlags(fs *flag.FlagSet, c *config) {
	fs.BoolVar(&c.DockerTLSVerify, "docker_tls_verify", c.DockerTLSVerify, "use TLS and verify the daemon for a tcp:// -docker (default: $DOCKER_TLS_VERIFY set)")
	fs.StringVar(&c.DockerCertPath, "docker_cert_path", c.DockerCertPath, "directory of ca.pem and the optional cert.pem, key.pem for -docker_tls_verify (default $DOCKER_CERT_PATH, else ~/.docker)")
}

// dockerUsesTLS says whether the endpoint is reached with TLS.
func (c config) dockerUsesTLS() bool {
	return c.DockerTLSVerify && !strings.HasPrefix(c.Docker, "unix://")
}

// dockerOptions say how to reach Docker, as the flags and the environment
// say.
func (c config) dockerOptions() dockerc.Options {
	return dockerc.Options{Endpoint: c.Docker, TLS: c.dockerUsesTLS(), CertPath: c.DockerCertPath}
}

// newDockerClient connects to Docker as the flags say (dockerc.New).
func newDockerClient(ctx context.Context, cfg config, log *slog.Logger) (*dockerc.Client, error) {
	return dockerc.New(ctx, cfg.dockerOptions(), log)
}

// validateDockerTLS checks that TLS has a CA to verify the daemon with:
// go-dockerclient would silently skip verification without one.
func (c config) validateDockerTLS() error {
	if !c.dockerUsesTLS() {
		return nil
	}
	if c.DockerCertPath == "" {
		return badFlag("docker_cert_path", "must name the directory of ca.pem with -docker_tls_verify")
	}
	if _, err := os.Stat(filepath.Join(c.DockerCertPath, "ca.pem")); err != nil {
		return badFlag("docker_cert_path", "ca.pem, needed to verify the daemon: %v", err)
	}
	_, cerr := os.Stat(filepath.Join(c.DockerCertPath, "cert.pem"))
	_, kerr := os.Stat(filepath.Join(c.DockerCertPath, "key.pem"))
	if (cerr == nil) != (kerr == nil) {
		return badFlag("docker_cert_path", "%s has only one of cert.pem and key.pem", c.DockerCertPath)
	}
	return nil
}

// builtinRoutes are the routes the daemon serves besides the two paths
// its flags name (-webhook_path, -registry_webhook_path). main.go's
// handler registers one handler for each, and validate refuses them as a
// flag's path: one list, so that a route added here can never be named by
// a flag (the mux would panic on the duplicate).
var builtinRoutes = []string{
	"/api/deploy",
	"/api/harbor/webhook",
	"/api/github/webhook",
	"/api/quay/webhook",
	"/api/rollback",
	"/api/pin",
	"/api/unpin",
	"GET /api/policy",
	"PUT /api/policy",
	"/api/freeze",
	"/api/thaw",
	"/api/promote",
	"/api/abort",
	"GET /healthz",
	"GET /api/status",
	"GET /api/history",
	"GET /metrics",
	"GET /{$}", // the dashboard (dashboard.go)
	"/ui/",
}

// checkFreeRoute refuses p, a flag's path (a plain path, checkPlainPath),
// when it names a built-in route or one of the paths in also (the other
// flag's), or collides with one as the mux sees it (a %-escaped spelling
// of the same path): served, it would make the daemon panic or shadow
// the route.
func checkFreeRoute(p string, also ...string) (err error) {
	paths := make([]string, 0, len(builtinRoutes)+len(also))
	for _, r := range builtinRoutes {
		_, path, _ := strings.Cut(r, "/")
		paths = append(paths, "/"+path)
	}
	paths = append(paths, also...)
	taken := func() error {
		return fmt.Errorf("%q is taken by a route the daemon serves (%s)", p, strings.Join(paths, ", "))
	}
	if slices.Contains(paths, p) {
		return taken()
	}
	defer func() {
		if recover() != nil {
			err = taken()
		}
	}()
	mux := http.NewServeMux()
	for _, r := range builtinRoutes {
		mux.Handle(r, http.NotFoundHandler())
	}
	for _, a := range also {
		mux.Handle(a, http.NotFoundHandler())
	}
	mux.Handle(p, http.NotFoundHandler())
	return nil
}
