package main

// haltmove.go: halt records written by an earlier version, at their
// legacy key under the rollout's directory (etcd.go legacyHaltKey), are
// moved to their key under haltsPrefix once, when a node starts
// (main.go start), before anything of it reads a halt. Readers read the
// new key only.
//
// Several nodes may start at once: each record moves in one transaction
// that compares the legacy key's ModRevision as read, so one node moves
// it and the others find it gone. A tag that already has a record at the
// new key (a halt written since by an upgraded node) keeps it: the
// legacy record is dropped, not moved over it.

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

// moveHaltAttempts bounds the tries of moveHaltsAtStart.
const moveHaltAttempts = 3

// moveHaltsAtStart moves the legacy halt records, trying again after
// retryDelay (doubling) while etcd fails, at most moveHaltAttempts
// times; then it says what is left and lets the node start (the next
// start tries again).
func moveHaltsAtStart(ctx context.Context, kv clientv3.KV, retryDelay time.Duration, log *slog.Logger) {
	for attempt := 1; ; attempt++ {
		moved, err := moveLegacyHalts(ctx, kv, callTimeout, log)
		if moved > 0 {
			log.Info("moved halt records to their new key", "moved", moved, "prefix", haltsPrefix)
		}
		if err == nil || ctx.Err() != nil {
			return
		}
		if attempt == moveHaltAttempts {
			log.Warn("halt records at their legacy key not moved; no node sees them until a start moves them", "err", err)
			return
		}
		if !backoff.Sleep(ctx, backoff.Delay(retryDelay, attempt)) {
			return
		}
	}
}

// moveLegacyHalts moves every halt record at its legacy key to its new
// key, each call bounded by timeout, and returns how many it moved.
func moveLegacyHalts(ctx context.Context, kv clientv3.KV, timeout time.Duration, log *slog.Logger) (moved int, err error) {
	gctx, cancel := context.WithTimeout(ctx, timeout)
	resp, err := kv.Get(gctx, rolloutsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	cancel()
	if err != nil {
		return 0, fmt.Errorf("read the rollouts' keys: %w", err)
	}
	for _, k := range resp.Kvs {
		ref, ok := refFromLegacyHaltKey(string(k.Key))
		if !ok {
			continue
		}
		ok, err := moveLegacyHalt(ctx, kv, ref, timeout, log)
		if err != nil {
			return moved, err
		}
		if ok {
			moved++
		}
	}
	return moved, nil
}

// moveLegacyHalt moves ref's legacy halt record, unless another node
// moves or rewrites it first; it reports whether this call moved it.
func moveLegacyHalt(ctx context.Context, kv clientv3.KV, ref string, timeout time.Duration, log *slog.Logger) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	from, to := legacyHaltKey(ref), haltKey(ref)
	// An old node may rewrite the record between the read and the
	// transaction: read it again then (a few times; it stays for the
	// next start otherwise).
	for range 3 {
		got, err := kv.Get(ctx, from)
		if err != nil {
			return false, fmt.Errorf("read the legacy halt of %s: %w", ref, err)
		}
		if len(got.Kvs) == 0 {
			return false, nil // moved by another node
		}
		old := got.Kvs[0]
		resp, err := kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(from), "=", old.ModRevision)).
			Then(clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(to), "=", 0)},
				[]clientv3.Op{clientv3.OpPut(to, string(old.Value)), clientv3.OpDelete(from)},
				[]clientv3.Op{clientv3.OpDelete(from)},
			)).Commit()
		if err != nil {
			return false, fmt.Errorf("move the legacy halt of %s: %w", ref, err)
		}
		if !resp.Succeeded {
			continue // moved or rewritten meanwhile: read again
		}
		if resp.Responses[0].GetResponseTxn().Succeeded {
			return true, nil
		}
		log.Warn("dropped a halt record at its legacy key: the tag has one at its new key", "image", ref, "dropped", string(old.Value))
		return false, nil
	}
	return false, nil
}
