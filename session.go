package main

import (
	"context"
	"fmt"

	"go.etcd.io/etcd/client/v3/concurrency"
)

// sessCtx is sess with a deadline: the lease grant ends with ctx (and
// within callTimeout), so that a caller that stops, the status reporter at
// shutdown above all, never waits for an unreachable etcd.
// concurrency.NewSession grants its lease under the client's own context,
// which only Close ends, and the client waits for a connection.
// The lease is kept alive under the client's context, as NewSession does,
// until rollout.close revokes it.
func (r *rollout) sessCtx(ctx context.Context) (*concurrency.Session, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.session != nil {
		select {
		case <-r.session.Done():
			r.session = nil
		default:
			return r.session, nil
		}
	}
	gctx, cancel := context.WithCancel(ctx)
	if r.callTimeout > 0 {
		gctx, cancel = context.WithTimeout(ctx, r.callTimeout)
	}
	defer cancel()
	grant, err := r.etcd.Grant(gctx, sessionTTL)
	if err != nil {
		return nil, fmt.Errorf("etcd lease grant: %w", err)
	}
	s, err := concurrency.NewSession(r.etcd, concurrency.WithTTL(sessionTTL), concurrency.WithLease(grant.ID))
	if err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
		_, _ = r.etcd.Revoke(rctx, grant.ID)
		cancel()
		return nil, err
	}
	r.session = s
	return s, nil
}
