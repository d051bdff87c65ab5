package main

// timeouts.go: the bounds of calls to Docker and etcd that have none of
// their own, of a deploy in flight at shutdown, and the safety net of the
// loops that sleep until something is due.

import "time"

// callTimeout bounds one call to Docker or etcd that has no bound of its
// own (a pull has pullTimeout).
const callTimeout = 30 * time.Second

// drainMargin is what a deploy in flight gets at shutdown beyond
// -kill_timeout to finish its stops and report.
const drainMargin = 2 * time.Second

// dueTick is the safety net of the loops that sleep until something is
// due (etcdc.DueLoop: the holds' releases, the canary rollouts): a pass at
// least this often, for a change a watch missed.
const dueTick = time.Minute
