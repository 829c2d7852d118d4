// lincheck: records a history of concurrent etcd operations against any
// etcd endpoint (etcd itself or kubeshard), then checks that it is
// linearizable (porcupine, with the model in model.go) and that watches
// saw every change once, in order, without gaps.
//
// Clients run gets, puts of unique values, deletes and compare-and-swap
// transactions on a few keys for --duration. A write that fails or times
// out has an unknown outcome: it is resolved from the watch (its unique
// value was written at the revision the watch shows, or it never
// happened), as etcd's robustness tests do. Faults are injected from
// outside (lincheck.py); lincheck only keeps going through them.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anishathalye/porcupine"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

type record struct {
	client  int
	in      input
	out     output
	call    int64
	ret     int64
	unknown bool // a write whose outcome the client does not know
	refused bool // answered "request timed out": with --timeout-refuses, never applied
}

type event struct {
	Rev    int64
	Key    int
	Delete bool
	Value  int64
}

type summary struct {
	Endpoints     string  `json:"endpoints"`
	Strict        bool    `json:"strict"`
	Operations    int     `json:"operations"`
	Unknown       int     `json:"unknown_outcome"`
	UnknownHappen int     `json:"unknown_applied"`
	Errors        int     `json:"errors"`
	WatchEvents   int     `json:"watch_events"`
	WatchRestarts int     `json:"watch_restarts"`
	Linearizable  string  `json:"linearizable"`
	WatchProblems int     `json:"watch_problems"`
	Seconds       float64 `json:"check_seconds"`
}

var base = time.Now()

func now() int64 { return int64(time.Since(base)) }

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	duration := flag.Duration("duration", 20*time.Second, "how long the clients run")
	clients := flag.Int("clients", 6, "concurrent clients")
	keyList := flag.String("keys", "/lin/k0,/lin/k1,/lin/k2,/lin/k3", "comma-separated keys (at most 8)")
	strict := flag.Bool("strict", true, "revisions are dense (etcd, one kubeshard shard)")
	opTimeout := flag.Duration("op-timeout", 20*time.Second, "deadline of one operation")
	checkTimeout := flag.Duration("check-timeout", 5*time.Minute, "longest the porcupine check may take")
	visualize := flag.String("visualize", "", "write porcupine's HTML of the history here")
	seed := flag.Int64("seed", time.Now().UnixNano(), "random seed")
	timeoutRefuses := flag.Bool("timeout-refuses", false, "a write answered \"etcdserver: request timed out\" was not applied (kubeshard's promise; etcd's answer may have been)")
	corrupt := flag.Int("corrupt-reads", 0, "self-test: record every Nth read as having seen the key's previous value (the check must fail)")
	flag.Parse()
	keys := strings.Split(*keyList, ",")
	if len(keys) > MaxKeys || len(keys) == 0 {
		fail("--keys: 1 to %d keys", MaxKeys)
	}
	eps := strings.Split(*endpoints, ",")
	newClient := func() *clientv3.Client {
		c, err := clientv3.New(clientv3.Config{
			Endpoints:   eps,
			DialTimeout: 5 * time.Second,
			Logger:      zap.NewNop(),
		})
		if err != nil {
			fail("client: %v", err)
		}
		return c
	}
	setup := newClient()
	start := startRevision(setup, keys, *opTimeout)

	// Watches of every key from the start, resumed after each end.
	stopWatch := make(chan struct{})
	var wg sync.WaitGroup
	watchers := make([][]event, 2)
	restarts := make([]int, 2)
	progress := make([]atomic.Int64, 2)
	for w := range watchers {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			watchers[w], restarts[w] = watch(newClient(), keys, start+1, stopWatch, &progress[w])
		}(w)
	}

	// The clients.
	records := make([][]record, *clients)
	errorsSeen := make([]int, *clients)
	deadline := time.Now().Add(*duration)
	var cw sync.WaitGroup
	for c := 0; c < *clients; c++ {
		cw.Add(1)
		go func(c int) {
			defer cw.Done()
			records[c], errorsSeen[c] = runClient(newClient(), c, keys, deadline, *opTimeout, *seed+int64(c), *corrupt)
		}(c)
	}
	cw.Wait()

	// The final state, then a write after it; the watches run until they
	// saw that write and every acknowledged one.
	final, finalRev := finalState(setup, keys, *opTimeout)
	target := sentinel(setup, *opTimeout)
	for _, rs := range records {
		for _, r := range rs {
			if !r.unknown && r.in.Kind != opGet && r.out.Rev > target {
				target = r.out.Rev
			}
		}
	}
	waitUntil := time.Now().Add(60 * time.Second)
	for time.Now().Before(waitUntil) && !(progress[0].Load() >= target && progress[1].Load() >= target) {
		time.Sleep(50 * time.Millisecond)
	}
	close(stopWatch)
	wg.Wait()

	sum := summary{Endpoints: *endpoints, Strict: *strict}
	for c := range records {
		sum.Operations += len(records[c])
		sum.Errors += errorsSeen[c]
	}
	for _, r := range restarts {
		sum.WatchRestarts += r
	}
	problems := checkWatches(watchers, records, final, finalRev, keys)
	if *timeoutRefuses {
		problems = append(problems, refusedApplied(records, longest(watchers))...)
	}
	reference := longest(watchers)
	sum.WatchEvents = len(reference)
	sum.WatchProblems = len(problems)
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, "watch:", p)
	}

	for _, p := range revisionOrder(records) {
		fmt.Fprintln(os.Stderr, "revision order:", p)
	}
	ops, unknown, applied := history(records, reference)
	sum.Unknown, sum.UnknownHappen = unknown, applied
	began := time.Now()
	model := newModel(start, *strict)
	result, info := porcupine.CheckOperationsVerbose(model, ops, *checkTimeout)
	sum.Seconds = time.Since(began).Seconds()
	switch result {
	case porcupine.Ok:
		sum.Linearizable = "yes"
	case porcupine.Illegal:
		sum.Linearizable = "no"
	default:
		sum.Linearizable = "unknown (check timed out)"
	}
	if *visualize != "" && result != porcupine.Ok {
		if err := porcupine.VisualizePath(model, info, *visualize); err != nil {
			fmt.Fprintln(os.Stderr, "visualize:", err)
		}
	}
	out, _ := json.Marshal(sum)
	fmt.Println(string(out))
	if result != porcupine.Ok || len(problems) > 0 {
		os.Exit(1)
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lincheck: "+format+"\n", args...)
	os.Exit(2)
}

// startRevision reads the keys (they must not exist) and the revision.
func startRevision(c *clientv3.Client, keys []string, timeout time.Duration) int64 {
	for attempt := 0; attempt < 50; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		rev := int64(0)
		ok := true
		for _, k := range keys {
			r, err := c.Get(ctx, k)
			if err != nil {
				ok = false
				break
			}
			if len(r.Kvs) > 0 {
				cancel()
				fail("key %s exists already: use a fresh store", k)
			}
			if r.Header.Revision > rev {
				rev = r.Header.Revision
			}
		}
		cancel()
		if ok {
			return rev
		}
		time.Sleep(200 * time.Millisecond)
	}
	fail("cannot read the keys before the run")
	return 0
}

func keyIndex(keys []string, key []byte) int {
	for i, k := range keys {
		if k == string(key) {
			return i
		}
	}
	return -1
}

// sentinel writes a key no client uses (seen by the watches, which
// ignore it) and gives its revision.
func sentinel(c *clientv3.Client, timeout time.Duration) int64 {
	for attempt := 0; attempt < 100; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		resp, err := c.Put(ctx, "/lin-end", "")
		cancel()
		if err == nil {
			return resp.Header.Revision
		}
		time.Sleep(200 * time.Millisecond)
	}
	fail("cannot write after the run")
	return 0
}

func watch(c *clientv3.Client, keys []string, from int64, stop chan struct{}, progress *atomic.Int64) ([]event, int) {
	var events []event
	next := from
	restarts := -1
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-stop; cancel() }()
	for ctx.Err() == nil {
		restarts++
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		ch := c.Watch(wctx, "\x00", clientv3.WithFromKey(), clientv3.WithRev(next))
		for resp := range ch {
			if resp.Err() != nil || resp.Canceled {
				break
			}
			for _, e := range resp.Events {
				if e.Kv.ModRevision > progress.Load() {
					progress.Store(e.Kv.ModRevision)
				}
				k := keyIndex(keys, e.Kv.Key)
				if k < 0 {
					continue
				}
				v, _ := strconv.ParseInt(string(e.Kv.Value), 10, 64)
				events = append(events, event{Rev: e.Kv.ModRevision, Key: k, Delete: e.Type == clientv3.EventTypeDelete, Value: v})
				if e.Kv.ModRevision >= next {
					next = e.Kv.ModRevision + 1
				}
			}
		}
		wcancel()
		if ctx.Err() == nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	return events, restarts
}

func runClient(c *clientv3.Client, id int, keys []string, deadline time.Time, timeout time.Duration, seed int64, corrupt int) ([]record, int) {
	rng := rand.New(rand.NewSource(seed))
	var out []record
	errors := 0
	seq := int64(0)
	lastMod := make([]int64, len(keys))
	lastFound := make([]kv, len(keys))
	reads := 0
	for time.Now().Before(deadline) {
		k := rng.Intn(len(keys))
		key := keys[k]
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		r := record{client: id, call: now()}
		var err error
		switch p := rng.Intn(10); {
		case p < 4:
			r.in = input{Kind: opGet, Key: k}
			var resp *clientv3.GetResponse
			resp, err = c.Get(ctx, key)
			if err == nil {
				r.out.Rev = resp.Header.Revision
				if len(resp.Kvs) == 1 {
					r.out.Found = found(resp.Kvs[0].Value, resp.Kvs[0].ModRevision, resp.Kvs[0].CreateRevision, resp.Kvs[0].Version)
					lastMod[k] = resp.Kvs[0].ModRevision
				}
				reads++
				if corrupt > 0 && reads%corrupt == 0 && r.out.Found != lastFound[k] && lastFound[k].Exists {
					// A stale read, as a broken store would give.
					r.out.Found, lastFound[k] = lastFound[k], r.out.Found
				} else {
					lastFound[k] = r.out.Found
				}
			}
		case p < 7:
			seq++
			v := int64(id)*1_000_000_000 + seq
			r.in = input{Kind: opPut, Key: k, Value: v}
			var resp *clientv3.PutResponse
			resp, err = c.Put(ctx, key, strconv.FormatInt(v, 10))
			if err == nil {
				r.out.Rev = resp.Header.Revision
				lastMod[k] = resp.Header.Revision
			}
		case p < 8:
			r.in = input{Kind: opDelete, Key: k}
			var resp *clientv3.DeleteResponse
			resp, err = c.Delete(ctx, key)
			if err == nil {
				r.out.Rev = resp.Header.Revision
				r.out.Deleted = resp.Deleted
			}
		default:
			seq++
			v := int64(id)*1_000_000_000 + seq
			mod := lastMod[k]
			if rng.Intn(4) == 0 {
				mod = 0
			}
			r.in = input{Kind: opCas, Key: k, Value: v, Mod: mod}
			var resp *clientv3.TxnResponse
			resp, err = c.Txn(ctx).
				If(clientv3.Compare(clientv3.ModRevision(key), "=", mod)).
				Then(clientv3.OpPut(key, strconv.FormatInt(v, 10))).
				Else(clientv3.OpGet(key)).
				Commit()
			if err == nil {
				r.out.Rev = resp.Header.Revision
				r.out.Succeeded = resp.Succeeded
				if resp.Succeeded {
					lastMod[k] = resp.Header.Revision
				} else if rr := resp.Responses[0].GetResponseRange(); rr != nil && len(rr.Kvs) == 1 {
					kv := rr.Kvs[0]
					r.out.Found = found(kv.Value, kv.ModRevision, kv.CreateRevision, kv.Version)
					lastMod[k] = kv.ModRevision
				}
			}
		}
		cancel()
		r.ret = now()
		if err != nil {
			errors++
			if r.in.Kind == opGet {
				// A read that failed says nothing.
				time.Sleep(50 * time.Millisecond)
				continue
			}
			r.unknown = true
			r.refused = strings.HasSuffix(err.Error(), "etcdserver: request timed out")
			time.Sleep(50 * time.Millisecond)
		}
		out = append(out, r)
	}
	return out, errors
}

func found(value []byte, mod, create, version int64) kv {
	v, _ := strconv.ParseInt(string(value), 10, 64)
	return kv{Exists: true, Value: v, Mod: mod, Create: create, Version: version}
}

func finalState(c *clientv3.Client, keys []string, timeout time.Duration) ([]kv, int64) {
	for attempt := 0; attempt < 100; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		resp, err := c.Get(ctx, "\x00", clientv3.WithFromKey())
		cancel()
		if err != nil {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		state := make([]kv, len(keys))
		for _, x := range resp.Kvs {
			if k := keyIndex(keys, x.Key); k >= 0 {
				state[k] = found(x.Value, x.ModRevision, x.CreateRevision, x.Version)
			}
		}
		return state, resp.Header.Revision
	}
	fail("cannot read the final state")
	return nil, 0
}

func longest(watchers [][]event) []event {
	var best []event
	for _, w := range watchers {
		if len(w) > len(best) {
			best = w
		}
	}
	return best
}

// checkWatches: each watch in revision order without repeats; all agree
// and none skips a change the others saw in its span; every acknowledged
// write is there; the changes add up to the final state.
func checkWatches(watchers [][]event, records [][]record, final []kv, finalRev int64, keys []string) []string {
	var problems []string
	ref := longest(watchers)
	byRev := map[int64]event{}
	for _, e := range ref {
		byRev[e.Rev] = e
	}
	for w, events := range watchers {
		for i := 1; i < len(events); i++ {
			if events[i].Rev <= events[i-1].Rev {
				problems = append(problems, fmt.Sprintf("watch %d: revision %d after %d", w, events[i].Rev, events[i-1].Rev))
			}
		}
		if len(events) == 0 {
			continue
		}
		seen := map[int64]bool{}
		for _, e := range events {
			seen[e.Rev] = true
			if r, ok := byRev[e.Rev]; !ok || r != e {
				problems = append(problems, fmt.Sprintf("watch %d: %+v, the longest watch has %+v", w, e, r))
			}
		}
		first, last := events[0].Rev, events[len(events)-1].Rev
		for _, e := range ref {
			if e.Rev >= first && e.Rev <= last && !seen[e.Rev] {
				problems = append(problems, fmt.Sprintf("watch %d skipped %+v", w, e))
			}
		}
	}
	for _, rs := range records {
		for _, r := range rs {
			if r.unknown {
				continue
			}
			switch {
			case r.in.Kind == opPut || (r.in.Kind == opCas && r.out.Succeeded):
				if e, ok := byRev[r.out.Rev]; !ok || e.Delete || e.Value != r.in.Value || e.Key != r.in.Key {
					problems = append(problems, fmt.Sprintf("acknowledged write of v%d to k%d at %d: the watch has %+v", r.in.Value, r.in.Key, r.out.Rev, e))
				}
			case r.in.Kind == opDelete && r.out.Deleted > 0:
				if e, ok := byRev[r.out.Rev]; !ok || !e.Delete || e.Key != r.in.Key {
					problems = append(problems, fmt.Sprintf("acknowledged delete of k%d at %d: the watch has %+v", r.in.Key, r.out.Rev, e))
				}
			}
		}
	}
	folded := make([]kv, len(keys))
	for _, e := range ref {
		if e.Rev > finalRev {
			break
		}
		if e.Delete {
			folded[e.Key] = kv{}
			continue
		}
		old := folded[e.Key]
		next := kv{Exists: true, Value: e.Value, Mod: e.Rev, Create: e.Rev, Version: 1}
		if old.Exists {
			next.Create, next.Version = old.Create, old.Version+1
		}
		folded[e.Key] = next
	}
	for k := range keys {
		if folded[k] != final[k] {
			problems = append(problems, fmt.Sprintf("k%d: the watch adds up to %v, a read gives %v", k, folded[k], final[k]))
		}
	}
	return problems
}

// history gives porcupine's operations: writes of unknown outcome found in
// the watch happened at the revision it shows (and may have taken effect
// any time after their call); the others never happened.
func history(records [][]record, ref []event) ([]porcupine.Operation, int, int) {
	put := map[int64]event{}
	claimed := map[int64]bool{}
	for _, e := range ref {
		if !e.Delete {
			put[e.Value] = e
		}
	}
	for _, rs := range records {
		for _, r := range rs {
			if !r.unknown && r.in.Kind == opDelete && r.out.Deleted > 0 {
				claimed[r.out.Rev] = true
			}
		}
	}
	var deletes []event
	for _, e := range ref {
		if e.Delete && !claimed[e.Rev] {
			deletes = append(deletes, e)
		}
	}
	var ops []porcupine.Operation
	unknown, applied := 0, 0
	var pending []record
	for _, rs := range records {
		for _, r := range rs {
			if r.unknown {
				unknown++
				pending = append(pending, r)
				continue
			}
			ops = append(ops, porcupine.Operation{ClientId: r.client, Input: r.in, Call: r.call, Output: r.out, Return: r.ret})
		}
	}
	sort.Slice(pending, func(i, j int) bool { return pending[i].call < pending[j].call })
	for _, r := range pending {
		var out output
		switch r.in.Kind {
		case opPut, opCas:
			e, ok := put[r.in.Value]
			if !ok {
				continue
			}
			out = output{Rev: e.Rev, Succeeded: true}
		case opDelete:
			// A delete of the key that no acknowledged delete explains.
			match := -1
			for i, e := range deletes {
				if e.Key == r.in.Key && !claimed[e.Rev] {
					match = i
					break
				}
			}
			if match < 0 {
				continue
			}
			claimed[deletes[match].Rev] = true
			out = output{Rev: deletes[match].Rev, Deleted: 1}
		}
		applied++
		ops = append(ops, porcupine.Operation{ClientId: r.client, Input: r.in, Call: r.call, Output: out, Return: math.MaxInt64})
	}
	return ops, unknown, applied
}

// revisionOrder finds acknowledged writes that started after another write
// had returned and yet got a lower revision: what breaks linearizability
// when revisions do not follow real time. A few, to explain a failure.
func revisionOrder(records [][]record) []string {
	var writes []record
	for _, rs := range records {
		for _, r := range rs {
			if r.unknown || r.in.Kind == opGet || (r.in.Kind == opDelete && r.out.Deleted == 0) || (r.in.Kind == opCas && !r.out.Succeeded) {
				continue
			}
			writes = append(writes, r)
		}
	}
	byReturn := append([]record(nil), writes...)
	sort.Slice(byReturn, func(i, j int) bool { return byReturn[i].ret < byReturn[j].ret })
	sort.Slice(writes, func(i, j int) bool { return writes[i].call < writes[j].call })
	var found []string
	var top record
	j := 0
	for _, w := range writes {
		for j < len(byReturn) && byReturn[j].ret < w.call {
			if byReturn[j].out.Rev > top.out.Rev {
				top = byReturn[j]
			}
			j++
		}
		if top.out.Rev >= w.out.Rev && len(found) < 5 {
			found = append(found, fmt.Sprintf("k%d written at %d (client %d, from %.3fs) after k%d at %d (client %d) had returned at %.3fs",
				w.in.Key, w.out.Rev, w.client, float64(w.call)/1e9, top.in.Key, top.out.Rev, top.client, float64(top.ret)/1e9))
		}
	}
	return found
}

// refusedApplied finds puts answered "request timed out" whose value the
// watch shows: kubeshard says that answer means the write never happened.
func refusedApplied(records [][]record, ref []event) []string {
	written := map[int64]int64{}
	for _, e := range ref {
		if !e.Delete {
			written[e.Value] = e.Rev
		}
	}
	var found []string
	for _, rs := range records {
		for _, r := range rs {
			if !r.refused || (r.in.Kind != opPut && r.in.Kind != opCas) {
				continue
			}
			if rev, ok := written[r.in.Value]; ok {
				found = append(found, fmt.Sprintf("v%d to k%d was answered 'request timed out' and written at %d", r.in.Value, r.in.Key, rev))
			}
		}
	}
	return found
}
