package main

// nodeid.go: the claim of a node name: one live deployer per -node_name,
// held by a leased key in etcd.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
	"github.com/die-net/deployer/internal/etcdc"
)

// Node identity. A live deployer holds ownerKey (<prefix>/_owner/<node>),
// bound to a lease it keeps alive, so that a second deployer with the same
// -node_name (which would overwrite the first one's progress and status)
// refuses to start. A deployer that was killed leaves its key until the
// lease expires; the next incarnation waits for that, or takes over at
// once when the holder is provably a dead process of the same machine.

// ownerTTL is the lease of the owner key, in seconds: how long a killed
// deployer's name stays taken when the takeover cannot prove it dead.
const ownerTTL = 10

// nodeOwner is the owner key's value: who holds the name.
type nodeOwner struct {
	Host    string    `json:"host"`
	BootID  string    `json:"boot_id,omitempty"`
	PIDNS   string    `json:"pid_ns,omitempty"`
	PID     int       `json:"pid"`
	Listen  string    `json:"listen,omitempty"`
	Started time.Time `json:"started"`
}

func thisProcess(listen string) nodeOwner {
	host, _ := os.Hostname()
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	ns, _ := os.Readlink("/proc/self/ns/pid")
	return nodeOwner{Host: host, BootID: strings.TrimSpace(string(boot)), PIDNS: ns, PID: os.Getpid(), Listen: listen, Started: time.Now().UTC()}
}

// deadHere reports whether the holder was a process of this machine, in
// this PID namespace, that no longer exists: a previous incarnation that
// was killed. Anything else (another machine, another container) is only
// known dead when its lease expires.
func (o nodeOwner) deadHere(self nodeOwner) bool {
	if o.BootID == "" || o.BootID != self.BootID || o.PIDNS == "" || o.PIDNS != self.PIDNS || o.Host != self.Host || o.PID <= 0 || o.PID == self.PID {
		return false
	}
	err := syscall.Kill(o.PID, 0)
	return errors.Is(err, syscall.ESRCH)
}

// sameProcess reports whether o is this very process (its own key).
func (o nodeOwner) sameProcess(self nodeOwner) bool {
	return o.BootID != "" && o.BootID == self.BootID && o.PIDNS == self.PIDNS && o.Host == self.Host &&
		o.PID == self.PID && o.Started.Equal(self.Started)
}

func (o nodeOwner) String() string {
	return fmt.Sprintf("host %s, pid %d, listening on %s, since %s", o.Host, o.PID, o.Listen, o.Started.Format(time.RFC3339))
}

// errNodeNameTaken is returned when another live deployer has our name.
var errNodeNameTaken = errors.New("node name taken")

// nodeClaim holds the owner key of one node name.
type nodeClaim struct {
	cli    *clientv3.Client
	key    string
	self   nodeOwner
	ttl    int           // lease seconds
	wait   time.Duration // how long to wait for a previous holder's lease
	poll   time.Duration
	log    *slog.Logger
	sess   *etcdc.Session
	callTO time.Duration
	retry  time.Duration // the backoff's base while etcd does not answer at start
}

// newNodeClaim returns the claim of node's name, retried every retry
// (with backoff) while etcd does not answer. It starts nothing.
func newNodeClaim(cli *clientv3.Client, node, listen string, retry time.Duration, log *slog.Logger) *nodeClaim {
	return &nodeClaim{
		cli: cli, key: ownerKey(node), self: thisProcess(listen), ttl: ownerTTL,
		wait: ownerTTL*time.Second + 3*time.Second, poll: 500 * time.Millisecond, log: log, callTO: 5 * time.Second, retry: retry,
	}
}

// run takes the name, with backoff while etcd does not answer, closes
// held, keeps the name until ctx is done and then releases it. It fails
// only with errNodeNameTaken (a live deployer holds the name); it returns
// nil when ctx ends.
func (c *nodeClaim) run(ctx context.Context, held chan<- struct{}) error {
	for attempt := 1; ; attempt++ {
		err := c.acquire(ctx)
		if err == nil {
			break
		}
		if errors.Is(err, errNodeNameTaken) {
			return err
		}
		if ctx.Err() != nil {
			return nil // stopped while starting
		}
		c.log.Warn("cannot claim the node name in etcd yet", "err", err)
		if !backoff.Sleep(ctx, backoff.Delay(c.retry, attempt)) {
			return nil
		}
	}
	close(held)
	c.keep(ctx)
	return nil
}

// acquire takes the name, waiting up to c.wait for a previous holder's
// lease to expire; it fails with errNodeNameTaken while a live deployer
// holds it.
func (c *nodeClaim) acquire(ctx context.Context) error {
	// The grant is bounded by ctx; the keepalives and the revoke at
	// release are not: a session bound to the daemon's context would end
	// at shutdown before release, keep would take the name again, and the
	// revoke of that new lease would fail, leaving the name taken for a
	// restart in place until the lease expired.
	gctx, cancel := context.WithTimeout(ctx, c.callTO)
	lease, err := c.cli.Grant(gctx, int64(c.ttl))
	cancel()
	if err != nil {
		return fmt.Errorf("etcd lease for the node name: %w", err)
	}
	sess := etcdc.NewSession(context.WithoutCancel(ctx), c.cli, lease.ID, c.ttl).Start()
	val, _ := json.Marshal(c.self)
	deadline := time.Now().Add(c.wait)
	logged := false
	for {
		tctx, cancel := context.WithTimeout(ctx, c.callTO)
		resp, err := c.cli.Txn(tctx).
			If(clientv3.Compare(clientv3.CreateRevision(c.key), "=", 0)).
			Then(clientv3.OpPut(c.key, string(val), clientv3.WithLease(sess.Lease()))).
			Else(clientv3.OpGet(c.key)).
			Commit()
		cancel()
		if err != nil {
			_ = sess.Close() // revoking failed: the lease expires by itself
			return fmt.Errorf("etcd: claim %s: %w", c.key, err)
		}
		if resp.Succeeded {
			c.sess = sess
			return nil
		}
		var holder nodeOwner
		var modRev int64
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
			_ = json.Unmarshal(kvs[0].Value, &holder)
			modRev = kvs[0].ModRevision
		}
		// Our own key from a lease that lapsed (etcd unreachable longer
		// than the TTL), or a killed predecessor's: take it at once.
		if own, dead := holder.sameProcess(c.self), holder.deadHere(c.self); own || dead {
			if dead {
				c.log.Info("taking over the node name from a previous deployer that is gone", "previous", holder.String())
			}
			tctx, cancel := context.WithTimeout(ctx, c.callTO)
			_, err := c.cli.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(c.key), "=", modRev)).Then(clientv3.OpDelete(c.key)).Commit()
			cancel()
			if err != nil {
				_ = sess.Close() // revoking failed: the lease expires by itself
				return fmt.Errorf("etcd: take over %s: %w", c.key, err)
			}
			continue
		}
		if time.Now().After(deadline) {
			_ = sess.Close() // revoking failed: the lease expires by itself
			return fmt.Errorf("%w: another deployer is running with this -node_name (%s); give every deployer its own -node_name", errNodeNameTaken, holder)
		}
		if !logged {
			c.log.Warn("node name held by another deployer; waiting for its lease to expire (a previous run that was killed) before giving up",
				"holder", holder.String(), "wait", c.wait)
			logged = true
		}
		if !backoff.Sleep(ctx, c.poll) {
			_ = sess.Close() // revoking failed: the lease expires by itself
			return ctx.Err()
		}
	}
}

// keep re-takes the name whenever the lease is lost (etcd unreachable
// longer than the TTL) until ctx is done, then releases it.
func (c *nodeClaim) keep(ctx context.Context) {
	defer c.release()
	for attempt := 1; ; {
		select {
		case <-ctx.Done():
			return
		case <-c.sess.Done():
		}
		if ctx.Err() != nil {
			return
		}
		c.log.Warn("lost the etcd lease of the node name; taking it again")
		_ = c.sess.Close() // revoking failed: the lease expires by itself
		for {
			err := c.acquire(ctx)
			if err == nil {
				attempt = 1
				break
			}
			if ctx.Err() != nil {
				c.sess = nil
				return
			}
			c.log.Error("cannot take the node name back", "err", err)
			if !backoff.Sleep(ctx, backoff.Delay(time.Second, attempt)) {
				c.sess = nil
				return
			}
			attempt++
		}
	}
}

// release gives the name up at once (revokes the lease).
func (c *nodeClaim) release() {
	if c.sess != nil {
		_ = c.sess.Close() // revoking failed: the lease expires by itself
	}
}

// containerIDHostname is what Docker names a container's host by default:
// its short ID.
var containerIDHostname = regexp.MustCompile(`^[0-9a-f]{12}([0-9a-f]{52})?$`)

// warnContainerHostname logs a warning when the node name defaulted to a
// hostname that looks like a container ID: a container without host
// networking gets a new one on every run.
func warnContainerHostname(log *slog.Logger, nodeName, hostname string) bool {
	if nodeName != hostname || !containerIDHostname.MatchString(hostname) {
		return false
	}
	log.Warn("the hostname looks like a container ID, which changes on every run; set -node_name to this machine's name", "node", nodeName)
	return true
}
