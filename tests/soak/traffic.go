// soak-traffic: Kubernetes-shaped etcd traffic for a long run, with a
// report every minute (one JSON line on stdout): operations per second,
// latency percentiles, errors, watch events. soak.py runs it against
// kubeshard and samples the processes beside it.
//
// The traffic is what kube-apiserver sends for a few resource types:
// creates (Txn: mod_revision == 0, then put), updates (get, then Txn on
// the mod_revision read), deletes (Txn on the mod_revision), gets, lists
// in pages of 500 at the first page's revision, one watch per resource,
// events attached to a lease granted every minute with a 120 s TTL (as
// kube-apiserver does for Events), and a compaction every two minutes at
// the revision of two minutes before (kube-apiserver's compactor, faster).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

var resources = []string{"pods", "configmaps", "events", "leases"}

type stats struct {
	mu        sync.Mutex
	latencies map[string][]time.Duration
	errors    map[string]int
	firstErr  map[string]string // the first error of each kind of operation in the minute
}

func (s *stats) add(op string, d time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.errors[op]++
		if _, ok := s.firstErr[op]; !ok {
			s.firstErr[op] = err.Error()
		}
		return
	}
	s.latencies[op] = append(s.latencies[op], d)
}

func (s *stats) take() (map[string][]time.Duration, map[string]int, map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, e, f := s.latencies, s.errors, s.firstErr
	s.latencies, s.errors, s.firstErr = map[string][]time.Duration{}, map[string]int{}, map[string]string{}
	return l, e, f
}

type minute struct {
	Minute       int                `json:"minute"`
	OpsPerSecond float64            `json:"ops_per_s"`
	P50Ms        float64            `json:"p50_ms"`
	P99Ms        float64            `json:"p99_ms"`
	P99ByOpMs    map[string]float64 `json:"p99_ms_by_op"`
	Errors       map[string]int     `json:"errors"`
	FirstErrors  map[string]string  `json:"first_errors,omitempty"`
	WatchEvents  int64              `json:"watch_events"`
	WatchRestart int64              `json:"watch_restarts"`
	Objects      int64              `json:"objects"`
	Revision     int64              `json:"revision"`
}

func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p)
	return float64(sorted[i].Microseconds()) / 1000
}

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	duration := flag.Duration("duration", time.Hour, "how long the traffic runs")
	clients := flag.Int("clients", 8, "concurrent clients")
	names := flag.Int("objects", 1000, "names per resource (the store holds up to this many of each)")
	valueSize := flag.Int("value-size", 1024, "bytes per object")
	flag.Parse()
	cfg := clientv3.Config{Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	newClient := func() *clientv3.Client {
		c, err := clientv3.New(cfg)
		if err != nil {
			fmt.Fprintln(os.Stderr, "soak-traffic:", err)
			os.Exit(2)
		}
		return c
	}
	// A little past the duration, so that the last whole minute is reported
	// before the clients stop; the report loop ends the run after it.
	ctx, cancel := context.WithTimeout(context.Background(), *duration+10*time.Second)
	defer cancel()
	minutes := int(*duration / time.Minute)
	st := &stats{latencies: map[string][]time.Duration{}, errors: map[string]int{}, firstErr: map[string]string{}}
	var watchEvents, watchRestarts atomic.Int64
	var revision atomic.Int64
	var lease atomic.Int64
	value := strings.Repeat("x", *valueSize)

	for _, r := range resources {
		go func(prefix string) {
			c := newClient()
			next := int64(0)
			for ctx.Err() == nil {
				opts := []clientv3.OpOption{clientv3.WithPrefix()}
				if next > 0 {
					opts = append(opts, clientv3.WithRev(next))
				}
				for resp := range c.Watch(clientv3.WithRequireLeader(ctx), prefix, opts...) {
					if resp.CompactRevision > 0 {
						// Behind the compaction: start over at the present, as an informer relists.
						next = 0
						break
					}
					if resp.Err() != nil {
						break
					}
					watchEvents.Add(int64(len(resp.Events)))
					if n := len(resp.Events); n > 0 {
						next = resp.Events[n-1].Kv.ModRevision + 1
					}
				}
				if ctx.Err() == nil {
					watchRestarts.Add(1)
					time.Sleep(100 * time.Millisecond)
				}
			}
		}("/registry/" + r + "/")
	}

	// Leases for events, and compaction, as kube-apiserver does.
	go func() {
		c := newClient()
		tick := time.NewTicker(time.Minute)
		defer tick.Stop()
		for {
			// Twice the renewal period, so that a create a moment after
			// the next grant is not given a lease that has just expired
			// (kube-apiserver's events reuse a lease far from its end).
			grant, err := c.Grant(ctx, 120)
			if err == nil {
				lease.Store(int64(grant.ID))
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	go func() {
		c := newClient()
		tick := time.NewTicker(2 * time.Minute)
		defer tick.Stop()
		previous := int64(0)
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if previous > 0 {
				start := time.Now()
				_, err := c.Compact(ctx, previous)
				st.add("compact", time.Since(start), err)
			}
			previous = revision.Load()
		}
	}()

	var wg sync.WaitGroup
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c := newClient()
			rng := rand.New(rand.NewSource(int64(i) + time.Now().UnixNano()))
			for ctx.Err() == nil {
				res := resources[rng.Intn(len(resources))]
				key := fmt.Sprintf("/registry/%s/ns%d/obj%d", res, rng.Intn(10), rng.Intn(*names/10+1))
				opCtx, opCancel := context.WithTimeout(ctx, 30*time.Second)
				start := time.Now()
				var op string
				var err error
				var rev int64
				switch p := rng.Intn(100); {
				case p < 15:
					op = "create"
					var opts []clientv3.OpOption
					if res == "events" {
						if l := lease.Load(); l != 0 {
							opts = append(opts, clientv3.WithLease(clientv3.LeaseID(l)))
						}
					}
					var r *clientv3.TxnResponse
					r, err = c.Txn(opCtx).If(clientv3.Compare(clientv3.ModRevision(key), "=", 0)).
						Then(clientv3.OpPut(key, value, opts...)).Else(clientv3.OpGet(key)).Commit()
					if err == nil {
						rev = r.Header.Revision
					}
				case p < 45:
					op = "update"
					var g *clientv3.GetResponse
					g, err = c.Get(opCtx, key)
					if err == nil && len(g.Kvs) == 1 {
						kv := g.Kvs[0]
						var r *clientv3.TxnResponse
						r, err = c.Txn(opCtx).If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
							Then(clientv3.OpPut(key, value, clientv3.WithLease(clientv3.LeaseID(kv.Lease)))).Else(clientv3.OpGet(key)).Commit()
						if err == nil {
							rev = r.Header.Revision
						} else if errors.Is(err, rpctypes.ErrLeaseNotFound) {
							// Its lease expired since the get: etcd's answer, not a fault.
							err = nil
						}
					}
				case p < 50:
					op = "delete"
					var g *clientv3.GetResponse
					g, err = c.Get(opCtx, key)
					if err == nil && len(g.Kvs) == 1 {
						_, err = c.Txn(opCtx).If(clientv3.Compare(clientv3.ModRevision(key), "=", g.Kvs[0].ModRevision)).
							Then(clientv3.OpDelete(key)).Else(clientv3.OpGet(key)).Commit()
					}
				case p < 80:
					op = "get"
					_, err = c.Get(opCtx, key)
				default:
					op = "list"
					prefix := "/registry/" + res + "/"
					from := prefix
					listRev := int64(0)
					for {
						opts := []clientv3.OpOption{clientv3.WithRange(clientv3.GetPrefixRangeEnd(prefix)), clientv3.WithLimit(500)}
						if listRev > 0 {
							opts = append(opts, clientv3.WithRev(listRev))
						}
						var r *clientv3.GetResponse
						r, err = c.Get(opCtx, from, opts...)
						if err != nil || !r.More || len(r.Kvs) == 0 {
							break
						}
						listRev = r.Header.Revision
						from = string(r.Kvs[len(r.Kvs)-1].Key) + "\x00"
					}
				}
				opCancel()
				st.add(op, time.Since(start), err)
				if rev > revision.Load() {
					revision.Store(rev)
				}
				if err != nil {
					time.Sleep(100 * time.Millisecond)
				}
			}
		}(i)
	}

	counter := newClient()
	tick := time.NewTicker(time.Minute)
	defer tick.Stop()
	for m := 1; ; m++ {
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-tick.C:
		}
		lat, errs, firstErrs := st.take()
		var all []time.Duration
		byOp := map[string]float64{}
		for op, ds := range lat {
			sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
			byOp[op] = percentile(ds, 0.99)
			all = append(all, ds...)
		}
		sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
		report := minute{Minute: m, OpsPerSecond: float64(len(all)) / 60, P50Ms: percentile(all, 0.5),
			P99Ms: percentile(all, 0.99), P99ByOpMs: byOp, Errors: errs, FirstErrors: firstErrs,
			WatchEvents: watchEvents.Swap(0), WatchRestart: watchRestarts.Swap(0), Revision: revision.Load()}
		cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
		if r, err := counter.Get(cctx, "/registry/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err == nil {
			report.Objects = r.Count
		}
		ccancel()
		out, _ := json.Marshal(report)
		fmt.Println(string(out))
		if minutes > 0 && m >= minutes {
			cancel()
			wg.Wait()
			return
		}
	}
}
