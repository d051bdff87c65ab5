package main

// timeouts.go: the bounds of calls to Docker and etcd that have none of
// their own, and of a deploy in flight at shutdown.

import "time"

// callTimeout bounds one call to Docker or etcd that has no bound of its
// own (a pull has pullTimeout).
const callTimeout = 30 * time.Second

// drainMargin is what a deploy in flight gets at shutdown beyond
// -kill_timeout to finish its stops and report.
const drainMargin = 2 * time.Second
