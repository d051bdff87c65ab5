package main

// auth.go: authentication of webhooks and of the API: the cluster's
// webhook secret, kept in etcd, and the rate limit of failed attempts.

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/time/rate"

	"github.com/die-net/deployer/internal/backoff"
)

// The cluster's webhook secret lives at clusterSecretKey
// (<prefix>/_secret/webhook): the first deployer to start creates it, every
// other node reads it, so that every node of a cluster accepts the same
// secret with no configuration. Anyone who can read etcd can read it; the
// embedded etcd listens on loopback only.

// secretBytes is how much randomness a generated secret carries.
const secretBytes = 32

// kvTxner is what the cluster secret needs from etcd.
type kvTxner interface {
	Txn(ctx context.Context) clientv3.Txn
}

// clusterSecret returns the cluster's webhook secret, creating a random one
// if there is none yet (create-if-absent: of two nodes starting at once,
// both end up with the one that was written first). created says whether
// this call wrote it.
func clusterSecret(ctx context.Context, kv kvTxner) (secret string, created bool, err error) {
	b := make([]byte, secretBytes)
	if _, err := rand.Read(b); err != nil {
		return "", false, fmt.Errorf("generate the webhook secret: %w", err)
	}
	fresh := hex.EncodeToString(b)
	key := clusterSecretKey
	resp, err := kv.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, fresh)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return "", false, fmt.Errorf("etcd: read or create the webhook secret: %w", err)
	}
	if resp.Succeeded {
		return fresh, true, nil
	}
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	if len(kvs) == 0 || len(kvs[0].Value) == 0 {
		return "", false, errors.New("etcd: the webhook secret is empty; delete its key to have a new one made")
	}
	return string(kvs[0].Value), false, nil
}

// readClusterSecret reads the secret without creating it (`deployer secret`).
func readClusterSecret(ctx context.Context, kv clientv3.KV) (string, error) {
	key := clusterSecretKey
	resp, err := kv.Get(ctx, key)
	if err != nil {
		return "", fmt.Errorf("etcd: %w", err)
	}
	if len(resp.Kvs) == 0 || len(resp.Kvs[0].Value) == 0 {
		return "", errors.New("no webhook secret yet: start a deployer with this -etcd_prefix and no -webhook_secret first")
	}
	return string(resp.Kvs[0].Value), nil
}

// failLimiter rate-limits requests that fail authentication, per remote
// address. Requests with the right secret never consult it.
type failLimiter struct {
	every time.Duration // one more failure allowed per every
	burst int
	max   int // addresses remembered; the least recently seen go first
	now   func() time.Time

	mu    sync.Mutex
	addrs map[string]*addrLimiter
}

type addrLimiter struct {
	lim  *rate.Limiter
	seen time.Time
}

func newFailLimiter() *failLimiter {
	return &failLimiter{every: time.Second, burst: 10, max: 4096, now: time.Now, addrs: map[string]*addrLimiter{}}
}

// allow records a failed request from remoteAddr and reports whether it is
// within the limit; retry is how long until the next one would be.
func (l *failLimiter) allow(remoteAddr string) (ok bool, retry time.Duration) {
	if l == nil {
		return true, 0
	}
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.addrs[host]
	if a == nil {
		if len(l.addrs) >= l.max {
			l.evict(now)
		}
		a = &addrLimiter{lim: rate.NewLimiter(rate.Every(l.every), l.burst)}
		l.addrs[host] = a
	}
	a.seen = now
	r := a.lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

// evict makes room: first every address whose bucket has refilled (it
// would start afresh anyway), else the least recently seen one. l.mu is
// held.
func (l *failLimiter) evict(now time.Time) {
	var oldest string
	for h, a := range l.addrs {
		if a.lim.TokensAt(now) >= float64(l.burst) {
			delete(l.addrs, h)
			continue
		}
		if oldest == "" || a.seen.Before(l.addrs[oldest].seen) {
			oldest = h
		}
	}
	if len(l.addrs) >= l.max && oldest != "" {
		delete(l.addrs, oldest)
	}
}

// rejectUnauthorized answers a request without the right secret: 401, or
// 429 when its address has failed too often.
func rejectUnauthorized(w http.ResponseWriter, r *http.Request, l *failLimiter) (code int, err error) {
	if ok, retry := l.allow(r.RemoteAddr); !ok {
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.Round(time.Second)/time.Second)+1))
		return http.StatusTooManyRequests, errTooManyFailures
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="deployer"`)
	return http.StatusUnauthorized, errWrongSecret
}

var (
	errWrongSecret     = errors.New("missing or wrong secret")
	errTooManyFailures = errors.New("too many requests with a missing or wrong secret")
)

// resolveSecret returns the webhook secret to serve with: -webhook_secret
// (or $DEPLOYER_WEBHOOK_SECRET) when set, else the cluster's in kv, created
// on the first start and read again with backoff until etcd answers or
// ctx ends. The log says how to get it, never what it is.
func resolveSecret(ctx context.Context, kv kvTxner, cfg config, log *slog.Logger) (string, error) {
	if cfg.WebhookSecret != "" {
		log.Info("webhooks, /api/status and /metrics need the secret given by -webhook_secret")
		return cfg.WebhookSecret, nil
	}
	var (
		secret  string
		created bool
		err     error
	)
	for attempt := 1; ; attempt++ {
		tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		secret, created, err = clusterSecret(tctx, kv)
		cancel()
		if err == nil {
			break
		}
		log.Warn("cannot read the cluster's webhook secret yet", "key", cfg.EtcdPrefix+clusterSecretKey, "err", err)
		if !backoff.Sleep(ctx, backoff.Delay(cfg.EtcdRetryDelay, attempt)) {
			return "", ctx.Err()
		}
	}
	how := "deployer secret -etcd_prefix " + cfg.EtcdPrefix
	if len(cfg.EtcdNodes) > 0 {
		how += " -etcd_nodes " + strings.Join(cfg.EtcdNodes, ",")
	} else if cfg.EtcdListenClient != defaultConfig(func(string) string { return "" }).EtcdListenClient {
		how += " -etcd_nodes " + cfg.EtcdListenClient
	}
	log.Info("webhooks, /api/status and /metrics need the cluster's webhook secret (kept in etcd); print it with the command given",
		"command", how, "created", created, "key", cfg.EtcdPrefix+clusterSecretKey)
	return secret, nil
}

// secretCell is the webhook secret a daemon serves with, set once at
// start (resolveSecret), before it listens; the handlers read it through
// get. Until it is set it is empty, which lets nothing in.
type secretCell struct{ v atomic.Pointer[string] }

func (c *secretCell) set(secret string) { c.v.Store(&secret) }

func (c *secretCell) get() string {
	if s := c.v.Load(); s != nil {
		return *s
	}
	return ""
}

// authorized checks the secret, given as "Authorization: Bearer <secret>"
// or as ?token=<secret>, in constant time. There is no unauthenticated
// mode: an empty secret matches nothing.
func authorized(r *http.Request, secret string) bool {
	if secret == "" {
		return false
	}
	got := r.URL.Query().Get("token")
	if a, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		got = a
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(secret)) == 1
}
