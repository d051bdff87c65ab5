package main

// webhook.go: the HTTP side of a trigger: the common acceptance of every
// webhook (method, secret, body size), writing the trigger to etcd, and
// the Docker Hub and Docker registry webhooks. The other senders are
// trigger_*.go.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

const maxBody = 1 << 20 // 1 MiB; Docker Hub payloads are a few KiB

// maxEnvelopePushes caps the manifest pushes one registry envelope may
// carry (after removing duplicates): they are written in one etcd
// transaction, and etcd refuses more than 128 operations in one
// (--max-txn-ops). A registry sends one event per envelope (distribution
// v3) or a small batch; beyond the cap the answer is 413.
const maxEnvelopePushes = 100

// kvPutter is what the webhook handlers need from etcd.
type kvPutter interface {
	// Put writes a trigger key.
	Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error)
	// Txn writes the triggers of one registry envelope at once.
	Txn(ctx context.Context) clientv3.Txn
}

// webhook receives build and push notifications and records each as a
// trigger key in etcd, which every node watches. It never deploys inline.
type webhook struct {
	kv       kvPutter      // confined to -etcd_prefix (etcdc.InPrefix)
	prefix   string        // -etcd_prefix, only to show the full key in replies and logs
	secret   func() string // never empty once serving: an empty secret lets nothing in
	failures *failLimiter  // rate of failed authentications per address; nil: no limit
	node     string
	log      *slog.Logger
	metrics  *metrics
	now      func() time.Time
	timeout  time.Duration // for the etcd write
	callback *http.Client  // for Docker Hub callbacks
	// deployNow serves POST /api/deploy with "now": true (policy_api.go);
	// nil: "now" is ignored.
	deployNow func(w http.ResponseWriter, r *http.Request, image string)

	mu     sync.Mutex
	closed bool           // Close began: no new callback
	wg     sync.WaitGroup // callbacks in flight
	// cut ends when Close stops waiting: the callbacks in flight are
	// cancelled.
	cut       context.Context
	cancelCut context.CancelFunc
}

// newWebhook returns the webhook handlers of a node: they write triggers
// through kv (confined to -etcd_prefix, which prefix names) and accept
// the secret that secret returns (the daemon's secretCell, set once before
// it listens); failures rate-limits failed authentications (nil: no
// limit). It starts nothing.
func newWebhook(kv kvPutter, prefix string, secret func() string, node string, failures *failLimiter, log *slog.Logger, m *metrics) *webhook {
	cut, cancelCut := context.WithCancel(context.Background())
	return &webhook{
		kv: kv, prefix: prefix, secret: secret, failures: failures, node: node, log: log, metrics: m,
		now: time.Now, timeout: 5 * time.Second, callback: &http.Client{Timeout: 10 * time.Second},
		cut: cut, cancelCut: cancelCut,
	}
}

// Close waits for the Docker Hub callbacks in flight, each bounded by the
// callback client's timeout. A handler still running (the HTTP server's
// shutdown gave up on it) sends no callback after Close began.
func (h *webhook) Close() { h.Shutdown(context.Background()) }

// Shutdown is Close until ctx ends: then it cancels the callbacks in
// flight and returns once they have.
func (h *webhook) Shutdown(ctx context.Context) {
	h.mu.Lock()
	h.closed = true
	h.mu.Unlock()
	done := make(chan struct{})
	go func() { h.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		h.log.Warn("stopping: docker hub callbacks in flight cancelled")
		h.cancelCut()
		<-done // a cancelled request returns at once
	}
	h.cancelCut()
}

// background runs f, a callback, unless Close began.
func (h *webhook) background(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		h.log.Warn("stopping: docker hub callback not sent")
		return
	}
	h.wg.Go(f)
}

type triggered struct {
	Key      string `json:"key"`
	Repo     string `json:"repository"`
	Tag      string `json:"tag,omitempty"`
	Revision int64  `json:"revision"`
}

// POST /api/dockerhub/webhook (-webhook_path)
//
// Docker Hub's build webhook. 200 with the etcd key and revision written;
// 400 for a payload that names no valid repository; 401, 405, 413; 503
// when etcd cannot be written, so that the sender can retry.
func (h *webhook) dockerHub(w http.ResponseWriter, r *http.Request) {
	body, ok := h.accept(w, r, "dockerhub")
	if !ok {
		return
	}
	p, err := parseDockerHub(body)
	if err != nil {
		h.fail(w, r, "dockerhub", http.StatusBadRequest, err)
		return
	}
	h.log.Info("docker hub webhook", "repo", p.Repo, "tag", p.Tag, "remote", r.RemoteAddr)
	t, err := h.trigger(r.Context(), p.Repo, trigger{Tag: p.Tag, Source: "dockerhub", Remote: r.RemoteAddr})
	if err != nil {
		h.fail(w, r, "dockerhub", http.StatusServiceUnavailable, err)
		h.dockerHubCallback(r.Context(), p.CallbackURL, "error", "etcd write failed: "+err.Error())
		return
	}
	h.metrics.webhooks.WithLabelValues("dockerhub", "ok").Inc()
	h.dockerHubCallback(r.Context(), p.CallbackURL, "success", "Triggered etcd "+t.Key)
	writeJSON(w, http.StatusOK, t)
}

// POST /api/registry/webhook (-registry_webhook_path)
//
// CNCF distribution notifications, and Azure Container Registry's webhook
// (one event of the same shape). Every manifest push by tag becomes a
// trigger for host/repository; all other events (blobs, pulls, deletes)
// are ignored with a 200, so that the registry's queue never backs up. A
// body that is neither an envelope nor one event, and a push by tag whose
// host and repository name no valid repository, are a 400, like every
// trigger's (a registry then retries: it cannot deploy either way, and
// its log shows why).
// All the triggers of one envelope are written in one etcd transaction:
// either all are recorded (200) or none is (503, the registry retries the
// envelope). An envelope with more than maxEnvelopePushes distinct pushes
// is refused with 413 and writes nothing.
func (h *webhook) registry(w http.ResponseWriter, r *http.Request) {
	body, ok := h.accept(w, r, "registry")
	if !ok {
		return
	}
	pushes, err := parseRegistryEnvelope(body)
	if err != nil {
		h.fail(w, r, "registry", http.StatusBadRequest, err)
		return
	}
	if len(pushes) > maxEnvelopePushes {
		h.fail(w, r, "registry", http.StatusRequestEntityTooLarge,
			fmt.Errorf("%d manifest pushes in one envelope; at most %d", len(pushes), maxEnvelopePushes))
		return
	}
	out := struct {
		Triggered []triggered `json:"triggered"`
	}{Triggered: []triggered{}}
	for _, p := range pushes {
		h.log.Info("registry push", "repo", p.Repo, "tag", p.Tag, "digest", p.Digest)
	}
	if len(pushes) > 0 {
		out.Triggered, err = h.triggerAll(r.Context(), r.RemoteAddr, pushes)
		if err != nil {
			h.fail(w, r, "registry", http.StatusServiceUnavailable, err)
			return
		}
	}
	result := "ok"
	if len(pushes) == 0 {
		result = "ignored"
	}
	h.metrics.webhooks.WithLabelValues("registry", result).Inc()
	writeJSON(w, http.StatusOK, out)
}

// triggerAll writes the triggers of one envelope in one etcd transaction.
// A key can be written only once in a transaction, so several tags of one
// repository share one trigger that names them all (trigger.Tags).
func (h *webhook) triggerAll(ctx context.Context, remote string, pushes []imagePush) ([]triggered, error) {
	now := h.now().UTC()
	var repos []string
	byRepo := map[string][]imagePush{}
	for _, p := range pushes {
		if byRepo[p.Repo] == nil {
			repos = append(repos, p.Repo)
		}
		byRepo[p.Repo] = append(byRepo[p.Repo], p)
	}
	var ops []clientv3.Op
	for _, repo := range repos {
		ps := byRepo[repo]
		t := trigger{Time: now, Source: "registry", Node: h.node, Remote: remote}
		if len(ps) == 1 {
			t.Tag, t.Digest = ps[0].Tag, ps[0].Digest
		} else {
			for _, p := range ps {
				t.Tags = append(t.Tags, p.Tag)
				if p.Digest != "" {
					if t.Digests == nil {
						t.Digests = map[string]string{}
					}
					t.Digests[p.Tag] = p.Digest
				}
			}
		}
		val, err := json.Marshal(t)
		if err != nil {
			return nil, err
		}
		ops = append(ops, clientv3.OpPut(triggerKey(repo), string(val)))
	}
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	resp, err := h.kv.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		h.metrics.etcdWrites.WithLabelValues("error").Inc()
		return nil, fmt.Errorf("etcd txn of %d triggers: %w", len(ops), err)
	}
	h.metrics.etcdWrites.WithLabelValues("ok").Inc()
	out := make([]triggered, 0, len(pushes))
	for _, p := range pushes {
		key := h.prefix + triggerKey(p.Repo)
		out = append(out, triggered{Key: key, Repo: p.Repo, Tag: p.Tag, Revision: resp.Header.Revision})
	}
	h.log.Info("triggers written", "keys", len(ops), "pushes", len(pushes), "revision", resp.Header.Revision)
	return out, nil
}

// accept checks method, secret and size, and returns the body.
func (h *webhook) accept(w http.ResponseWriter, r *http.Request, source string) ([]byte, bool) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		h.fail(w, r, source, http.StatusMethodNotAllowed, errors.New("only POST is allowed"))
		return nil, false
	}
	if !authorized(r, h.secret()) {
		code, err := rejectUnauthorized(w, r, h.failures)
		h.fail(w, r, source, code, err)
		return nil, false
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		h.fail(w, r, source, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes", maxBody))
		return nil, false
	}
	if err != nil {
		h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf("read body: %w", err))
		return nil, false
	}
	return body, true
}

// trigger writes the trigger key for repo.
func (h *webhook) trigger(ctx context.Context, repo string, t trigger) (triggered, error) {
	t.Time = h.now().UTC()
	t.Node = h.node
	val, err := json.Marshal(t)
	if err != nil {
		return triggered{}, err
	}
	key := triggerKey(repo)
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	resp, err := h.kv.Put(ctx, key, string(val))
	if err != nil {
		h.metrics.etcdWrites.WithLabelValues("error").Inc()
		return triggered{}, fmt.Errorf("etcd put %s: %w", h.prefix+key, err)
	}
	h.metrics.etcdWrites.WithLabelValues("ok").Inc()
	h.log.Info("trigger written", "key", h.prefix+key, "tag", t.Tag, "revision", resp.Header.Revision)
	return triggered{Key: h.prefix + key, Repo: repo, Tag: t.Tag, Revision: resp.Header.Revision}, nil
}

func (h *webhook) fail(w http.ResponseWriter, r *http.Request, source string, code int, err error) {
	h.metrics.webhooks.WithLabelValues(source, strings.ToLower(strings.ReplaceAll(http.StatusText(code), " ", "_"))).Inc()
	level := slog.LevelWarn
	if code == http.StatusTooManyRequests {
		level = slog.LevelDebug // a flood must not flood the log too
	}
	h.log.Log(r.Context(), level, "webhook rejected", "source", source, "status", code, "err", err)
	writeJSON(w, code, map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// dockerHubPush is what the deployer reads from a Docker Hub webhook.
type dockerHubPush struct {
	Repo        string
	Tag         string // empty: every local tag
	CallbackURL string
}

// parseDockerHub reads a Docker Hub webhook payload and validates the
// repository name and tag.
func parseDockerHub(body []byte) (dockerHubPush, error) {
	var p struct {
		CallbackURL string `json:"callback_url"`
		PushData    struct {
			Tag string `json:"tag"`
		} `json:"push_data"`
		Repository struct {
			RepoName string `json:"repo_name"`
		} `json:"repository"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return dockerHubPush{}, fmt.Errorf("invalid JSON: %w", err)
	}
	// Docker Hub's names are bare (they belong to -registry) and its tag
	// may be empty (every local tag).
	push, err := checkPush(imagePush{Repo: p.Repository.RepoName, Tag: p.PushData.Tag}, false)
	if err != nil {
		return dockerHubPush{}, fmt.Errorf("repository.repo_name %q, push_data.tag %q: %w", p.Repository.RepoName, p.PushData.Tag, err)
	}
	return dockerHubPush{Repo: push.Repo, Tag: push.Tag, CallbackURL: p.CallbackURL}, nil
}

var manifestTypes = map[string]bool{
	"application/vnd.docker.distribution.manifest.v2+json":      true,
	"application/vnd.docker.distribution.manifest.list.v2+json": true,
	"application/vnd.oci.image.manifest.v1+json":                true,
	"application/vnd.oci.image.index.v1+json":                   true,
	"application/vnd.docker.distribution.manifest.v1+json":      true,
	"application/vnd.docker.distribution.manifest.v1+prettyjws": true,
}

// registryEvent is one event of a distribution notification envelope, and
// the whole body of an Azure Container Registry webhook (ACR sends one
// event of the same shape, not an envelope).
type registryEvent struct {
	Action string `json:"action"`
	Target struct {
		MediaType  string `json:"mediaType"`
		Digest     string `json:"digest"`
		Repository string `json:"repository"`
		Tag        string `json:"tag"`
	} `json:"target"`
	Request struct {
		Host string `json:"host"`
	} `json:"request"`
}

// errNoEnvelope is the answer to a body that is neither an envelope nor
// one event: another sender (JFrog Artifactory, a Docker Hub or Harbor
// webhook) pointed at the registry endpoint.
var errNoEnvelope = errors.New(`no "events": the registry endpoint reads a CNCF distribution notification envelope {"events":[…]} or one Azure Container Registry event {"action","target","request"}; other senders have their own endpoints (README, Triggers)`)

// parseRegistryEnvelope reads a distribution notification envelope, or the
// single event of an Azure Container Registry webhook, and returns the
// manifest pushes by tag it holds, without duplicates. Other events (blobs,
// pulls, deletes, pushes by digest, ACR's ping) give none; a push by tag
// whose request.host and target.repository break checkPush's rule is an
// error, as is a body that is neither (errNoEnvelope).
func parseRegistryEnvelope(body []byte) ([]imagePush, error) {
	var env struct {
		Events json.RawMessage `json:"events"`
		registryEvent
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&env); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	var events []registryEvent
	field := "events"
	switch {
	case len(env.Events) > 0 && string(env.Events) != "null":
		if err := json.Unmarshal(env.Events, &events); err != nil {
			return nil, fmt.Errorf("events: %w", err)
		}
	case env.Action != "":
		events, field = []registryEvent{env.registryEvent}, "event"
	default:
		return nil, errNoEnvelope
	}
	var out []imagePush
	seen := map[imagePush]bool{}
	for i, e := range events {
		t := e.Target
		if e.Action != "push" || t.Tag == "" || !manifestTypes[t.MediaType] {
			continue
		}
		host := strings.ToLower(e.Request.Host)
		p, err := checkPush(imagePush{Repo: host + "/" + t.Repository, Tag: t.Tag, Digest: t.Digest}, true)
		if err != nil {
			if field == "events" {
				field = fmt.Sprintf("events[%d]", i)
			}
			return nil, fmt.Errorf("%s: request.host %q, target.repository %q, target.tag %q: %w", field, e.Request.Host, t.Repository, t.Tag, err)
		}
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out, nil
}

// dockerHubCallbackHosts are the only hosts a callback_url may name: the
// body is not authenticated, so any other URL would let a sender make us
// POST wherever it likes.
var dockerHubCallbackHosts = map[string]bool{"registry.hub.docker.com": true, "hub.docker.com": true}

// dockerHubCallback posts the result to Docker Hub's callback_url, in the
// background, best-effort; it never affects the deploy.
func (h *webhook) dockerHubCallback(ctx context.Context, rawURL, state, description string) {
	if rawURL == "" {
		return
	}
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "https" || !dockerHubCallbackHosts[u.Hostname()] || u.Port() != "" {
		h.log.Warn("ignoring callback_url outside Docker Hub", "callback_url", redactURL(rawURL))
		return
	}
	body, _ := json.Marshal(map[string]string{
		"state":       state,
		"description": truncate(description, 255),
		"context":     truncate("deployer on "+h.node, 100),
	})
	h.background(func() {
		// The request is answered before the callback: it must outlive it.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		defer context.AfterFunc(h.cut, cancel)() //nolint:contextcheck // h.cut ends when Shutdown gives up waiting for callbacks
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
		if err != nil {
			return
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := h.callback.Do(req)
		if err != nil {
			// The callback URL is a capability: keep it out of the log.
			h.log.Warn("docker hub callback failed", "err", redactErr(err, rawURL, u.String()))
			return
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		_ = resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			h.log.Warn("docker hub callback refused", "status", resp.StatusCode)
		}
	})
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
