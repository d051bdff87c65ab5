package main

// rollout.go: cluster coordination of rolling deploys. For one image tag,
// at most maxUnavailable containers are down at once across the cluster:
// before a node stops a stale container it takes a slot of an etcd
// semaphore for the tag, bound to the node's session lease (a crashed or
// partitioned node's slots go when its lease expires); it frees the slot
// once the replacement is up. A replacement that ran and failed halts the
// rollout of that image ID on every node.
//
// What counts against maxUnavailable is what is down, as Kubernetes
// counts it, not only the slots: every node's status reporter keeps a
// down record per tag (status.go) listing its containers of the tag that
// are restarting, paused, unhealthy or not yet healthy, no longer running,
// or on a Docker daemon that does not answer. A slot is granted while the
// containers in the slot keys ahead of it and in the down records, each
// container once, number fewer than maxUnavailable; a node whose own
// container is already down is granted at once: replacing it costs no
// more downtime, and it goes before the healthy nodes that wait.
//
// etcd keys (etcd.go), under -etcd_prefix:
//
//	<prefix>/_rollout/<tag ref, path-escaped>/slots/<lease>-<node>-<container>  slot holders (lease-bound), value "<node> <container>"
//	<prefix>/_rollout/<tag ref, path-escaped>/down/<node>                      the node's containers of the tag that are down (lease-bound)
//	<prefix>/_halt/<tag ref, path-escaped>                                     {"image_id",…} of a failed version
//
// The guarantees, and the faults they hold under:
//   - A node stops a container only while its slot key exists under its
//     own live lease: the grant and, again, the check just before the stop
//     are etcd transactions comparing the key's lease. A node whose lease
//     expired while it waited in the queue (partition, SIGSTOP, a long
//     pause) enters the queue again under a new session.
//   - A slot held by a node that dies or is cut off frees itself when the
//     lease expires (sessionTTL). If that happens while the node's own
//     container is down, two can be down for the rest of that wait: the
//     node logs it and stops nothing more under the lost slot.
//   - A slot that cannot be freed (etcd delete failing) ends the session,
//     so that its lease frees it within sessionTTL.
//   - Waiting for a slot is bounded (-slot_timeout); a timeout is a
//     node-local failure, retried, never a halt.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
	"github.com/die-net/deployer/internal/etcdc"
)

// sessionTTL is how many seconds a dead node's slots outlive it.
const sessionTTL = 10

// halt is the record of a version that failed to come up.
type halt struct {
	ImageID   string    `json:"image_id"`
	Node      string    `json:"node"`
	Container string    `json:"container"`
	Reason    string    `json:"reason"`
	Time      time.Time `json:"time"`
}

// haltedError says a version's rollout is halted: nothing to do here.
type haltedError struct{ h *halt }

func (e *haltedError) Error() string {
	return fmt.Sprintf("rollout of %s halted by %s: %s", shortID(e.h.ImageID), e.h.Node, e.h.Reason)
}

// errSlotLost: the node's lease, and with it the slot, went away.
var errSlotLost = errors.New("rollout slot lost with the etcd session")

// sessions is the node's session source (etcdc.NodeLease) as the rollout uses it.
type sessions interface {
	// Current returns the live session, granting a new lease if needed.
	Current(ctx context.Context) (*etcdc.Session, error)
	// Drop forgets a session whose lease is gone.
	Drop(s *etcdc.Session)
	// End gives up a session whose keys could not be deleted.
	End(s *etcdc.Session)
}

// rolloutEtcd is the part of the etcd client the rollout uses.
type rolloutEtcd interface {
	clientv3.KV
	clientv3.Watcher
}

// rollout coordinates replacements across the cluster.
type rollout struct {
	leases         sessions
	etcd           clientv3.Watcher // slot queue watches
	kv             clientv3.KV      // slot and halt reads and writes (etcd, unless a test injects faults)
	node           string
	maxUnavailable int           // 0: no coordination, everything at once
	slotTimeout    time.Duration // bound on waiting for a slot
	callTimeout    time.Duration
	log            *slog.Logger
	metrics        *metrics

	releaseBase time.Duration // first release retry delay
}

// newRollout returns the coordination of node's replacements through cli
// (confined to -etcd_prefix), its slots held under leases' sessions. It
// starts nothing; leases is closed by its owner after the last deploy.
func newRollout(cli rolloutEtcd, leases sessions, node string, maxUnavailable int, slotTimeout, callTimeout time.Duration, log *slog.Logger, m *metrics) *rollout {
	return &rollout{
		leases: leases, etcd: cli, kv: cli, node: node, maxUnavailable: maxUnavailable, slotTimeout: slotTimeout,
		callTimeout: callTimeout, log: log, metrics: m, releaseBase: 200 * time.Millisecond,
	}
}

// slot is a held rollout slot.
type slot struct {
	r    *rollout
	ref  string
	key  string
	sess *etcdc.Session
	// limit is the tag's max_unavailable, as a count (its policy).
	limit int
	// moved, while the node waits in the queue, is its slot key: the
	// first waiter may move the node's key there just as the node gives
	// up, and the release then frees both.
	moved string
}

// lost is closed when the slot's session ends.
func (s *slot) lost() <-chan struct{} { return s.sess.Done() }

// acquire takes one of the -max_unavailable slots of ref for container c
// (acquireN).
func (r *rollout) acquire(ctx context.Context, ref string, c staleContainer) (*slot, error) {
	return r.acquireN(ctx, ref, c, r.maxUnavailable)
}

// acquireN takes one of the limit slots of ref for container c (limit: the
// tag's max_unavailable as a count), first come first served by etcd
// create revision, within slotTimeout. A halt of c's new image, read in
// the same transactions, is returned as a *haltedError (and no slot).
func (r *rollout) acquireN(ctx context.Context, ref string, c staleContainer, limit int) (*slot, error) {
	ctx, cancel := context.WithTimeout(ctx, r.slotTimeout)
	defer cancel()
	for {
		s, err := r.leases.Current(ctx)
		if err != nil {
			return nil, r.acquireErr(ctx, err)
		}
		sl := &slot{r: r, ref: ref, sess: s, limit: limit,
			key: slotsDir(ref) + strconv.FormatInt(int64(s.Lease()), 16) + "-" + r.node + "-" + shortID(c.ID)}
		err = sl.queue(ctx, c)
		switch {
		case err == nil:
			return sl, nil
		case errors.Is(err, errSlotLost):
			r.leases.Drop(s)
			r.metrics.slotsLost.Inc()
			r.log.Warn("etcd session lost while waiting for a rollout slot; queueing again", "ref", ref, "container", c.Name)
			continue
		}
		sl.release(ctx)
		return nil, r.acquireErr(ctx, err)
	}
}

func (r *rollout) acquireErr(ctx context.Context, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("no rollout slot within %v: %w", r.slotTimeout, err)
	}
	var h *haltedError
	if errors.As(err, &h) {
		return err
	}
	return fmt.Errorf("take a rollout slot: %w", err)
}

// queue enters the queue of ref's slots and waits until it is granted
// a slot: fewer than maxUnavailable containers other than c unavailable
// (see read), or c itself down. The waiters queue under queueDir, first
// come first served by create revision, as etcd's lock recipe queues:
// each watches only what can let it in. A waiter with another ahead of
// it watches that one's key (and its own key and down record); the first
// waiter, with nobody ahead, counts the slot holders and the down
// records, watches them, and grants: in one transaction it moves its own
// key and those of the waiters behind it, as many as fit (at most
// maxUnavailable, each container once), from the queue to the slots. So
// when m slots are free the first m waiters go at once, a slot change
// wakes the first waiter alone, a waiter ahead leaving wakes the one
// behind it, and a waiter granted by the first wakes on its slot key being put.
// Every read is a transaction that first checks this node's queue key
// still exists under its lease; a key gone is a grant (its slot key
// exists under the lease) or errSlotLost, never a guess.
func (sl *slot) queue(ctx context.Context, c staleContainer) error {
	r := sl.r
	lease := sl.sess.Lease()
	qdir := queueDir(sl.ref)
	slotKey := sl.key
	sl.key = qdir + strings.TrimPrefix(slotKey, slotsDir(sl.ref)) // released as it is while queued
	sl.moved = slotKey
	val := r.node + " " + c.Name
	// Entering: the halt, this node's down record and the waiter just
	// ahead (the put is the newest key of the queue: the first of two
	// sorted by create revision, descending).
	tctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	resp, err := r.kv.Txn(tctx).Then(
		clientv3.OpPut(sl.key, val, clientv3.WithLease(lease)),
		clientv3.OpGet(haltKey(sl.ref)),
		clientv3.OpGet(downKey(sl.ref, r.node)),
		clientv3.OpGet(qdir, clientv3.WithPrefix(), clientv3.WithKeysOnly(),
			clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortDescend), clientv3.WithLimit(2)),
	).Commit()
	cancel()
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return errSlotLost
	}
	if err != nil {
		return fmt.Errorf("enter the slot queue: %w", err)
	}
	myRev := resp.Header.Revision // our key's create revision
	q := queueRead{rev: myRev, halt: resp.Responses[1], down: resp.Responses[2]}
	if kvs := resp.Responses[3].GetResponseRange().Kvs; len(kvs) == 2 {
		q.ahead = string(kvs[1].Key)
	}
	told := ""
	var (
		wcancel = func() {}
		watch   clientv3.WatchChan
		watched = "-" // what watch watches: the key ahead, or "" for the holders and down records
		look    = q.ahead == ""
	)
	defer func() { wcancel() }()
	for {
		if !look {
			if u := sl.read(q, c.Name); u.halted != nil && u.halted.ImageID == c.NewID {
				return &haltedError{u.halted}
			} else if u.selfDown {
				r.log.Info("container already down: replacing it costs no more downtime, slot granted", "ref", sl.ref,
					"container", c.Name, "unavailable", u.others)
				return sl.grant(ctx, slotKey, val)
			}
			// Wait for what can let us in. Watching from the revision
			// we read at misses nothing; the read is the truth.
			if watch == nil || watched != q.ahead {
				wcancel()
				watch, wcancel = sl.watchFor(ctx, q.ahead, q.rev+1)
				watched = q.ahead
			}
			select {
			case wr := <-watch:
				if sl.grantedBy(wr, lease) {
					// The first waiter moved our key to the slots: held.
					// (The halt is checked again before the stop: verify.)
					sl.key, sl.moved = slotKey, ""
					return nil
				}
				if wr.Canceled || wr.Err() != nil {
					wcancel() // ended (no leader, compacted): watch again from the next read
					watch = nil
				}
			case <-sl.sess.Done():
				return errSlotLost
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		look = false
		next, err := sl.look(ctx, myRev, slotKey)
		switch {
		case errors.Is(err, errGranted):
			if h := decodeHalt(next.halt.GetResponseRange().Kvs); h != nil && h.ImageID == c.NewID {
				return &haltedError{h} // the caller releases the slot
			}
			return nil
		case err != nil && ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, errSlotLost):
			return err
		case err != nil:
			r.log.Warn("counting rollout slots failed, retrying", "ref", sl.ref, "err", err)
			if !backoff.Sleep(ctx, time.Second) {
				return ctx.Err()
			}
			look = true
			continue
		}
		q = next
		if q.ahead != "" || q.first == nil {
			continue // wait for the one ahead
		}
		if u := sl.read(q, c.Name); (u.halted != nil && u.halted.ImageID == c.NewID) || u.selfDown {
			continue // decided above, without waiting
		}
		// First in the queue: grant ourselves and those behind us that fit.
		group, others := sl.fit(q, c.Name)
		if len(group) > 0 {
			switch err := sl.grantGroup(ctx, group, slotKey); {
			case err == nil:
				if len(group) > 1 {
					r.log.Debug("rollout slots granted to the first waiters at once", "ref", sl.ref, "waiters", len(group))
				}
				return nil
			case errors.Is(err, errSlotLost):
				return err
			case errors.Is(err, errGroupChanged):
				look = true // read again
				continue
			default:
				r.log.Warn("granting rollout slots failed, retrying", "ref", sl.ref, "err", err)
				if !backoff.Sleep(ctx, time.Second) {
					return ctx.Err()
				}
				look = true
				continue
			}
		}
		if s := strings.Join(others, ", "); s != told {
			told = s
			r.log.Info("waiting for a rollout slot", "ref", sl.ref, "container", c.Name, "max_unavailable", sl.limit,
				"unavailable", others)
		}
	}
}

// maxGroupGrant bounds the waiters one grant moves: each is two
// operations of the transaction, and etcd refuses a transaction of more
// than --max-txn-ops (default 128). The waiter after the last one
// granted is first then, and grants the next ones.
const maxGroupGrant = 64

// errGroupChanged: a waiter of the group left the queue between the read
// and the grant.
var errGroupChanged = errors.New("a waiter left the queue meanwhile")

// errGranted: the node's queue key was moved to the slots by the first
// waiter, under the node's lease: the slot is held.
var errGranted = errors.New("granted by the first waiter")

// queueRead is one read of the slot queue by a waiter.
type queueRead struct {
	rev        int64                      // the revision read at
	halt, down *etcdserverpb.ResponseOp   // the halt record, this node's down record
	ahead      string                     // the key of the waiter just ahead; "" for none
	first      []*etcdserverpb.ResponseOp // nobody ahead: the slot holders, every down record, the first waiters
}

// look reads the queue, in one transaction that checks this node's
// queue key still exists under its lease: the halt, this node's down
// record and the waiter just ahead, or, with nobody ahead (every key of
// the queue created at or after ours), the slot holders, every down
// record and the first maxUnavailable waiters. A queue key gone is
// errGranted when its slot key exists under the lease (sl.key is then
// the slot key), else errSlotLost.
func (sl *slot) look(ctx context.Context, myRev int64, slotKey string) (queueRead, error) {
	r := sl.r
	lease := sl.sess.Lease()
	qdir := queueDir(sl.ref)
	tctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	resp, err := r.kv.Txn(tctx).If(clientv3.Compare(clientv3.LeaseValue(sl.key), "=", lease)).Then(
		clientv3.OpGet(haltKey(sl.ref)),
		clientv3.OpGet(downKey(sl.ref, r.node)),
		clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(qdir), ">", myRev-1).WithPrefix()},
			[]clientv3.Op{
				clientv3.OpGet(slotsDir(sl.ref), clientv3.WithPrefix()),
				clientv3.OpGet(downDir(sl.ref), clientv3.WithPrefix()),
				clientv3.OpGet(qdir, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend),
					clientv3.WithLimit(int64(min(sl.limit, maxGroupGrant)))),
			},
			[]clientv3.Op{clientv3.OpGet(qdir, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithMaxCreateRev(myRev-1),
				clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortDescend), clientv3.WithLimit(1))}),
	).Else(clientv3.OpGet(slotKey), clientv3.OpGet(haltKey(sl.ref))).Commit()
	if err != nil {
		return queueRead{}, fmt.Errorf("read the slot queue: %w", err)
	}
	if !resp.Succeeded {
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 && kvs[0].Lease == int64(lease) {
			sl.key, sl.moved = slotKey, ""
			return queueRead{halt: resp.Responses[1]}, errGranted
		}
		return queueRead{}, errSlotLost
	}
	q := queueRead{rev: resp.Header.Revision, halt: resp.Responses[0], down: resp.Responses[1]}
	nested := resp.Responses[2].GetResponseTxn()
	if nested.Succeeded {
		q.first = nested.Responses
	} else if kvs := nested.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
		q.ahead = string(kvs[0].Key)
	}
	return q, nil
}

// fit returns, for the first waiter (q.first), the waiters to grant now,
// first come first served: the first ones of the queue, as long as the
// containers unavailable, each once, stay within maxUnavailable (a
// waiter whose container is down already costs nothing). others is what
// is unavailable besides the first waiter's container, for the log.
func (sl *slot) fit(q queueRead, name string) (group []*mvccpb.KeyValue, others []string) {
	return sl.fitKVs(q.first[0].GetResponseRange().Kvs, q.first[1].GetResponseRange().Kvs, q.first[2].GetResponseRange().Kvs, name)
}

func (sl *slot) fitKVs(slots, downs, waiters []*mvccpb.KeyValue, name string) (group []*mvccpb.KeyValue, others []string) {
	self := sl.r.node + "/" + name
	seen := map[string]bool{}
	add := func(unit string) {
		if !seen[unit] {
			seen[unit] = true
			if unit != self {
				others = append(others, unit)
			}
		}
	}
	for _, kv := range slots {
		node, ctr, _ := strings.Cut(string(kv.Value), " ")
		add(node + "/" + ctr)
	}
	for _, unit := range downUnits(downs) {
		add(unit)
	}
	for _, kv := range waiters {
		node, ctr, _ := strings.Cut(string(kv.Value), " ")
		switch unit := node + "/" + ctr; {
		case seen[unit]:
		case len(seen) < sl.limit:
			seen[unit] = true
		default:
			return group, others
		}
		group = append(group, kv)
	}
	return group, others
}

// grantGroup moves the keys of group (the first waiters, this node's
// first) from the queue to the slots under their own leases, in one
// transaction that checks each still exists under its lease.
func (sl *slot) grantGroup(ctx context.Context, group []*mvccpb.KeyValue, slotKey string) error {
	r := sl.r
	qdir, sdir := queueDir(sl.ref), slotsDir(sl.ref)
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for _, kv := range group {
		k := string(kv.Key)
		cmps = append(cmps, clientv3.Compare(clientv3.LeaseValue(k), "=", kv.Lease))
		ops = append(ops, clientv3.OpPut(sdir+strings.TrimPrefix(k, qdir), string(kv.Value), clientv3.WithLease(clientv3.LeaseID(kv.Lease))),
			clientv3.OpDelete(k))
	}
	tctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	resp, err := r.kv.Txn(tctx).If(cmps...).Then(ops...).Commit()
	switch {
	case err != nil:
		return fmt.Errorf("grant rollout slots: %w", err)
	case !resp.Succeeded:
		return errGroupChanged
	}
	sl.key, sl.moved = slotKey, ""
	return nil
}

// watchFor watches, from revision rev, what can let a waiter in: its
// slot key being put by the first waiter's grant, and the key ahead being
// deleted and this node's down record, or, with nobody ahead, the
// holders and every down record.
func (sl *slot) watchFor(ctx context.Context, ahead string, rev int64) (clientv3.WatchChan, context.CancelFunc) {
	r := sl.r
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	from := clientv3.WithRev(rev)
	own := r.etcd.Watch(wctx, sl.moved, from, clientv3.WithFilterDelete()) // our slot key, put by the first waiter's grant
	if ahead != "" {
		return mergeWatches(wctx, own, r.etcd.Watch(wctx, ahead, from, clientv3.WithFilterPut()),
			r.etcd.Watch(wctx, downKey(sl.ref, r.node), from)), cancel
	}
	return mergeWatches(wctx, own, r.etcd.Watch(wctx, slotsDir(sl.ref), clientv3.WithPrefix(), from),
		r.etcd.Watch(wctx, downDir(sl.ref), clientv3.WithPrefix(), from)), cancel
}

// grantedBy reports whether wr shows this node's slot key put under its
// lease: the first waiter granted it the slot.
func (sl *slot) grantedBy(wr clientv3.WatchResponse, lease clientv3.LeaseID) bool {
	for _, ev := range wr.Events {
		if ev.Type == clientv3.EventTypePut && string(ev.Kv.Key) == sl.moved && ev.Kv.Lease == int64(lease) {
			return true
		}
	}
	return false
}

// grant moves the node's key from the queue to the slots, in a
// transaction that checks it still exists under the node's lease.
func (sl *slot) grant(ctx context.Context, slotKey, val string) error {
	r := sl.r
	lease := sl.sess.Lease()
	tctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	resp, err := r.kv.Txn(tctx).If(clientv3.Compare(clientv3.LeaseValue(sl.key), "=", lease)).
		Then(clientv3.OpPut(slotKey, val, clientv3.WithLease(lease)), clientv3.OpDelete(sl.key)).Commit()
	switch {
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		return errSlotLost
	case err != nil:
		return fmt.Errorf("take the rollout slot: %w", err)
	case !resp.Succeeded:
		return errSlotLost
	}
	sl.key, sl.moved = slotKey, ""
	return nil
}

// mergeWatches delivers, on one channel, a signal for every response of
// any of the watches; it ends with ctx.
func mergeWatches(ctx context.Context, watches ...clientv3.WatchChan) clientv3.WatchChan {
	out := make(chan clientv3.WatchResponse, 1)
	fwd := func(ch clientv3.WatchChan) {
		for resp := range ch {
			select {
			case out <- resp:
			default: // a signal is pending already: the read after it sees this too
			}
		}
		select { // the watch ended (ctx, or no leader): wake the reader
		case out <- clientv3.WatchResponse{Canceled: true}:
		case <-ctx.Done():
		}
	}
	for _, w := range watches {
		go fwd(w)
	}
	return out
}

// unavailability is one count of a tag's unavailable containers.
type unavailability struct {
	halted   *halt
	others   []string // "<node>/<container>" unavailable, besides the one to replace
	selfDown bool     // the container to replace is down already
}

// read decodes, from a read of the queue, the halt and whether this
// node's container name is down already, and, for the first waiter, the
// containers of the tag unavailable besides it: those of the slot keys
// (replacements under way) and those the down records list, each
// container once.
func (sl *slot) read(q queueRead, name string) unavailability {
	u := unavailability{halted: decodeHalt(q.halt.GetResponseRange().Kvs)}
	self := sl.r.node + "/" + name
	for _, unit := range downUnits(q.down.GetResponseRange().Kvs) {
		if unit == self {
			u.selfDown = true
		}
	}
	if q.first != nil {
		_, u.others = sl.fitKVs(q.first[0].GetResponseRange().Kvs, q.first[1].GetResponseRange().Kvs, nil, name)
	}
	return u
}

// downUnits lists the "<node>/<container>" of down records.
func downUnits(kvs []*mvccpb.KeyValue) []string {
	var out []string
	for _, kv := range kvs {
		var d downRecord
		if json.Unmarshal(kv.Value, &d) != nil {
			continue
		}
		for _, c := range d.Containers {
			out = append(out, d.Node+"/"+c.Name)
		}
	}
	return out
}

// verify checks, in one etcd round trip, that the slot is still held under
// the node's live lease and that newID has not been halted meanwhile. It
// is called just before each stop or recreate.
func (sl *slot) verify(ctx context.Context, newID string) error {
	select {
	case <-sl.sess.Done():
		return errSlotLost
	default:
	}
	r := sl.r
	tctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	resp, err := r.kv.Txn(tctx).
		If(clientv3.Compare(clientv3.LeaseValue(sl.key), "=", sl.sess.Lease())).
		Then(clientv3.OpGet(haltKey(sl.ref))).Commit()
	if err != nil {
		return fmt.Errorf("verify the rollout slot: %w", err)
	}
	if !resp.Succeeded {
		return errSlotLost
	}
	if h := decodeHalt(resp.Responses[0].GetResponseRange().Kvs); h != nil && h.ImageID == newID {
		return &haltedError{h}
	}
	return nil
}

// release frees the slot, retrying with backoff; if etcd keeps refusing,
// it ends the session so that the lease frees the slot. Once ctx (the
// deploy's) has ended, at shutdown, it tries once, briefly: closing the
// rollout revokes the session anyway.
func (sl *slot) release(ctx context.Context) {
	r := sl.r
	tries, per := 4, min(r.callTimeout, 5*time.Second)
	if ctx.Err() != nil {
		tries, per = 1, time.Second
	}
	keys := []string{sl.key}
	if sl.moved != "" {
		keys = append(keys, sl.moved)
	}
	for attempt := 1; ; attempt++ {
		var err error
		for _, k := range keys {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), per)
			_, err = r.kv.Delete(dctx, k)
			cancel()
			if err != nil {
				break
			}
		}
		if err == nil {
			return
		}
		if attempt == tries {
			r.metrics.slotReleaseFailures.Inc()
			r.log.Warn("could not free the rollout slot; ending the etcd session so that its lease frees it",
				"key", sl.key, "err", err)
			if ctx.Err() != nil {
				// At the stop (or past the slot timeout) there is no time
				// for a revoke: the keepalives stop now, so the lease
				// expires within its TTL, and NodeLease.Close, which still
				// holds the session, revokes it at the stop.
				sl.sess.Orphan()
				return
			}
			r.leases.End(sl.sess)
			return
		}
		time.Sleep(backoff.Delay(r.releaseBase, attempt))
	}
}

func decodeHalt(kvs []*mvccpb.KeyValue) *halt {
	if len(kvs) == 0 {
		return nil
	}
	var h halt
	if err := json.Unmarshal(kvs[0].Value, &h); err != nil {
		return nil // unreadable: not halted
	}
	return &h
}

// halted reads the halt record of ref, with its modification revision.
func (r *rollout) halted(ctx context.Context, ref string) (*halt, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	resp, err := r.kv.Get(ctx, haltKey(ref))
	if err != nil || len(resp.Kvs) == 0 {
		return nil, 0, err
	}
	return decodeHalt(resp.Kvs), resp.Kvs[0].ModRevision, nil
}

// recordHalt writes the halt record of c's new image. It is called while
// the node still holds the tag's slot, and the slot is freed only after it
// returns: a node waiting for the slot reads the halt in the transaction
// that would grant it, and so never rolls the failed version out. A write
// that fails (etcd electing a leader, a timeout) is retried with capped
// backoff for as long as the deploy runs, the slot kept meanwhile; only a
// stop of the daemon ends the retries (the stop revokes the slot's lease).
func (r *rollout) recordHalt(ctx context.Context, ref string, c staleContainer, cause error) {
	h := halt{ImageID: c.NewID, Node: r.node, Container: c.Name, Reason: cause.Error(), Time: time.Now().UTC()}
	b, _ := json.Marshal(h)
	for attempt := 1; ; attempt++ {
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
		_, err := r.kv.Put(pctx, haltKey(ref), string(b))
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			r.log.Error("could not record the halted rollout before the stop", "ref", ref, "image", shortID(c.NewID), "err", err)
			return
		}
		r.log.Warn("could not record the halted rollout; keeping the slot and retrying", "ref", ref, "image", shortID(c.NewID),
			"attempt", attempt, "err", err)
		if !backoff.Sleep(ctx, backoff.Delay(r.releaseBase, attempt)) {
			r.log.Error("could not record the halted rollout before the stop", "ref", ref, "image", shortID(c.NewID), "err", err)
			return
		}
	}
	r.metrics.rolloutsHalted.Inc()
	r.log.Warn("rollout halted", "ref", ref, "image", shortID(c.NewID), "container", c.Name, "err", cause)
}

// clearHalt removes the halt record of ref if it names another image than
// the one now deployed: a later push resumes normal rollouts. The delete
// is conditional on the record being the one read, so that a halt of a
// newer version recorded meanwhile stays. The caller calls it for
// coordinated tags only (no coordination, no halts).
func (r *rollout) clearHalt(ctx context.Context, ref, imageID string) {
	h, rev, err := r.halted(ctx, ref)
	if err != nil || h == nil || h.ImageID == imageID {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	key := haltKey(ref)
	resp, err := r.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(clientv3.OpDelete(key)).Commit()
	switch {
	case err != nil:
		r.log.Warn("could not clear the halt record", "ref", ref, "err", err)
	case resp.Succeeded:
		r.log.Info("halt cleared by a newer version", "ref", ref, "halted_image", shortID(h.ImageID), "image", shortID(imageID))
	}
}
