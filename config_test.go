package main

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

func env(kv ...string) func(string) string {
	return func(k string) string {
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i] == k {
				return kv[i+1]
			}
		}
		return ""
	}
}

func TestParseFlagsDefaults(t *testing.T) {
	c, err := parseFlags("deployer", nil, env("HOME", "/home/u", "SLACK_WEBHOOK_URL", "https://hooks.slack.com/x"), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		name      string
		got, want any
	}{
		{"docker", c.Docker, "unix:///var/run/docker.sock"},
		{"dockercfg", c.DockerCfg, "/home/u/.dockercfg"},
		{"etcd_dial_timeout", c.EtcdDialTimeout, 5 * time.Second},
		{"etcd_nodes", strings.Join(c.EtcdNodes, ","), ""},
		{"etcd_data_dir", c.EtcdDataDir, "/var/lib/deployer/etcd"},
		{"etcd_listen_client", c.EtcdListenClient, "http://127.0.0.1:4001"},
		{"etcd_prefix", c.EtcdPrefix, "/deployer"},
		{"etcd_retry_delay", c.EtcdRetryDelay, 2 * time.Second},
		{"kill_timeout", c.KillTimeout, 10},
		{"listen", c.Listen, ":4500"},
		{"max_threads", c.MaxThreads, 4},
		{"registry", c.Registry, ""},
		{"webhook_secret", c.WebhookSecret, ""},
		{"tls_cert", c.TLSCert, ""},
		{"repull_period", c.RepullPeriod, 24 * time.Hour},
		{"slack_username", c.SlackUsername, "Deployer"},
		{"slack_webhook_url", c.SlackWebhookURL, "https://hooks.slack.com/x"},
		{"strong_consistency", c.StrongConsistency, false},
		{"webhook_path", c.WebhookPath, "/api/dockerhub/webhook"},
		{"registry_webhook_path", c.RegistryWebhookPath, "/api/registry/webhook"},
		{"log_format", c.LogFormat, "text"},
	}
	for _, w := range want {
		if w.got != w.want {
			t.Errorf("-%s = %v; want %v", w.name, w.got, w.want)
		}
	}
}

func TestParseFlagsEnvironment(t *testing.T) {
	c, err := parseFlags("deployer", nil, env("DOCKER_HOST", "tcp://127.0.0.1:2375", "DEPLOYER_WEBHOOK_SECRET", "s"), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Docker != "tcp://127.0.0.1:2375" || c.WebhookSecret != "s" {
		t.Errorf("docker %q secret %q; want $DOCKER_HOST and $DEPLOYER_WEBHOOK_SECRET", c.Docker, c.WebhookSecret)
	}
	c, err = parseFlags("deployer", []string{"-docker", "unix:///x.sock"}, env("DOCKER_HOST", "tcp://127.0.0.1:2375"), &bytes.Buffer{})
	if err != nil || c.Docker != "unix:///x.sock" {
		t.Errorf("-docker flag = %q, %v; want the flag to win over $DOCKER_HOST", c.Docker, err)
	}
}

func TestParseFlagsEtcdNodes(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"http://a:2379", []string{"http://a:2379"}},
		{"http://a:2379, http://b:2379 ,", []string{"http://a:2379", "http://b:2379"}},
	}
	for _, tt := range tests {
		c, err := parseFlags("deployer", []string{"-etcd_nodes", tt.in, "-node_name", "n"}, env(), &bytes.Buffer{})
		if err != nil {
			t.Fatalf("-etcd_nodes %q: %v", tt.in, err)
		}
		if !slices.Equal(c.EtcdNodes, tt.want) {
			t.Errorf("-etcd_nodes %q = %q; want %q", tt.in, c.EtcdNodes, tt.want)
		}
	}
}

func TestParseFlagsInvalid(t *testing.T) {
	tests := []struct {
		name string
		args []string
		flag string
	}{
		{"negative kill timeout", []string{"-kill_timeout", "-1"}, "-kill_timeout"},
		{"zero dial timeout", []string{"-etcd_dial_timeout", "0s"}, "-etcd_dial_timeout"},
		{"negative retry delay", []string{"-etcd_retry_delay", "-1s"}, "-etcd_retry_delay"},
		{"negative repull", []string{"-repull_period", "-1h"}, "-repull_period"},
		{"prefix without slash", []string{"-etcd_prefix", "deployer"}, "-etcd_prefix"},
		{"prefix with trailing slash", []string{"-etcd_prefix", "/deployer/"}, "-etcd_prefix"},
		{"empty webhook path", []string{"-webhook_path", ""}, "-webhook_path"},
		{"relative registry path", []string{"-registry_webhook_path", "api"}, "-registry_webhook_path"},
		{"same paths", []string{"-registry_webhook_path", "/api/dockerhub/webhook"}, "-registry_webhook_path"},
		{"etcd node not a URL", []string{"-etcd_nodes", "127.0.0.1:2379"}, "-etcd_nodes"},
		{"slack not a URL", []string{"-slack_webhook_url", "hooks.slack.com"}, "-slack_webhook_url"},
		{"docker not a URL", []string{"-docker", "/var/run/docker.sock"}, "-docker"},
		{"bad listen", []string{"-listen", "4500"}, "-listen"},
		{"zero threads", []string{"-max_threads", "0"}, "-max_threads"},
		{"no history", []string{"-history", "0"}, "-history"},
		{"no image kept", []string{"-keep_images", "0"}, "-keep_images"},
		{"bad registry", []string{"-registry", "https://"}, "-registry"},
		{"bad log format", []string{"-log_format", "xml"}, "-log_format"},
		{"node with slash", []string{"-node_name", "a/b"}, "-node_name"},
		{"extra argument", []string{"extra"}, "extra"},
		{"webhook path with an open brace", []string{"-webhook_path", "/hook/{"}, "-webhook_path"},
		{"webhook path with a wildcard", []string{"-webhook_path", "/hook/{repo}"}, "-webhook_path"},
		{"webhook path with a method", []string{"-webhook_path", "/x y"}, "-webhook_path"},
		{"registry path with a brace", []string{"-registry_webhook_path", "/reg/}"}, "-registry_webhook_path"},
		{"registry path with a query", []string{"-registry_webhook_path", "/reg?x=1"}, "-registry_webhook_path"},
		{"tls cert without key", []string{"-tls_cert", "/etc/c.pem"}, "-tls_cert"},
		{"tls key without cert", []string{"-tls_key", "/etc/k.pem"}, "-tls_cert"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseFlags("deployer", tt.args, env(), &bytes.Buffer{})
			if !errors.Is(err, errInvalidFlag) {
				t.Fatalf("parseFlags(%q) = %v; want errInvalidFlag", tt.args, err)
			}
			if !strings.Contains(err.Error(), tt.flag) {
				t.Errorf("parseFlags(%q) = %q; want it to name %s", tt.args, err, tt.flag)
			}
		})
	}
}

func TestParseFlagsHelpListsEveryFlag(t *testing.T) {
	var out bytes.Buffer
	_, err := parseFlags("deployer", []string{"-h"}, env("HOME", "/root"), &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v; want flag.ErrHelp", err)
	}
	for _, want := range []string{
		"-docker", `(default "unix:///var/run/docker.sock")`, "-dockercfg", `(default "/root/.dockercfg")`,
		"-etcd_dial_timeout", "(default 5s)", "-etcd_nodes", "empty runs an embedded single-member etcd", "-etcd_data_dir", `(default "/var/lib/deployer/etcd")`,
		"-etcd_prefix", `(default "/deployer")`, "-etcd_retry_delay", "(default 2s)", "-kill_timeout", "(default 10)",
		"-listen", `(default ":4500")`, "-max_threads", "(default 4)", "-registry", "empty means Docker Hub",
		"-repull_period", "(default 24h0m0s)", "-slack_username", `(default "Deployer")`, "-slack_webhook_url",
		"-strong_consistency", "-webhook_path", `(default "/api/dockerhub/webhook")`,
		"-node_name", "-webhook_secret", "-registry_webhook_path", "-etcd_data_dir", "-log_format", "-tls_cert", "-tls_key",
		"deployer secret",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("-h output lacks %s", want)
		}
	}
	// -etcd_nodes and -registry default to empty: no "(default …)" after
	// them, and max_threads shows 4 on any machine.
	for _, name := range []string{"etcd_nodes", "registry"} {
		if help := flagHelp(out.String(), name); help == "" || strings.Contains(help, "(default") {
			t.Errorf("-h for -%s = %q; want a help text without a default", name, help)
		}
	}
	if help := flagHelp(out.String(), "max_threads"); !strings.HasSuffix(help, "(default 4)") {
		t.Errorf("-h for -max_threads = %q; want (default 4)", help)
	}
}

// flagHelp returns the help text PrintDefaults printed for one flag.
func flagHelp(out, name string) string {
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if f := strings.Fields(l); len(f) > 0 && f[0] == "-"+name && i+1 < len(lines) {
			return strings.TrimSpace(lines[i+1])
		}
	}
	return ""
}

// TestHelpShowsNoSecretFromTheEnvironment: -h must not print the Slack
// token or the webhook secret taken from the environment as defaults.
func TestHelpShowsNoSecretFromTheEnvironment(t *testing.T) {
	var out bytes.Buffer
	e := env("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T1/B2/slacktoken", "DEPLOYER_WEBHOOK_SECRET", "envsecret")
	if _, err := parseFlags("deployer", []string{"-h"}, e, &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatal(err)
	}
	for _, leak := range []string{"slacktoken", "envsecret"} {
		if strings.Contains(out.String(), leak) {
			t.Errorf("-h shows %q from the environment", leak)
		}
	}
	c, err := parseFlags("deployer", nil, e, io.Discard)
	if err != nil || c.WebhookSecret != "envsecret" || !strings.HasSuffix(c.SlackWebhookURL, "slacktoken") {
		t.Errorf("environment defaults lost: %q %q %v", c.WebhookSecret, c.SlackWebhookURL, err)
	}
	c, err = parseFlags("deployer", []string{"-webhook_secret", "flag", "-slack_webhook_url", ""}, e, io.Discard)
	if err != nil || c.WebhookSecret != "flag" || c.SlackWebhookURL != "" {
		t.Errorf("flags must win over the environment: %q %q %v", c.WebhookSecret, c.SlackWebhookURL, err)
	}
}

// TestWebhookPathsRefuseBuiltinRoutes: a flag path that names a route the
// daemon serves itself (or spells one %-escaped, which the mux takes as
// the same) is refused with the flag error, for both path flags; served,
// it would make the daemon panic at its start or shadow the route.
func TestWebhookPathsRefuseBuiltinRoutes(t *testing.T) {
	taken := []string{"/api/deploy", "/api/harbor/webhook", "/api/github/webhook", "/api/quay/webhook",
		"/healthz", "/api/status", "/api/history", "/metrics", "/api/%64eploy"}
	for _, r := range builtinRoutes { // every route added later too
		_, p, _ := strings.Cut(r, "/")
		taken = append(taken, "/"+p)
	}
	type row struct {
		name string
		args []string
		flag string
	}
	var tests []row
	for _, p := range taken {
		tests = append(tests,
			row{"webhook_path " + p, []string{"-webhook_path", p}, "-webhook_path"},
			row{"registry_webhook_path " + p, []string{"-registry_webhook_path", p}, "-registry_webhook_path"})
	}
	tests = append(tests, row{"the other flag's path, escaped", []string{"-webhook_path", "/hook", "-registry_webhook_path", "/%68ook"}, "-registry_webhook_path"})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseFlags("deployer", tt.args, env(), &bytes.Buffer{})
			if !errors.Is(err, errInvalidFlag) || !strings.Contains(err.Error(), tt.flag+":") || strings.Contains(err.Error(), "\n") {
				t.Fatalf("parseFlags(%q) = %v; want one line of errInvalidFlag naming %s", tt.args, err, tt.flag)
			}
		})
	}
	for _, ok := range [][]string{{"-webhook_path", "/api/deploy/"}, {"-registry_webhook_path", "/healthz/x"}, {"-webhook_path", "/hooks/dockerhub"}} {
		if _, err := parseFlags("deployer", ok, env(), &bytes.Buffer{}); err != nil {
			t.Errorf("parseFlags(%q) = %v; want it accepted", ok, err)
		}
	}
}
