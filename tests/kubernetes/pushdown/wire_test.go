//go:build pushdown

// Checks the selector push-down patches (*.patch here) on the etcd API and
// client modules: the new fields' wire encoding, and that the client sends
// them to a gRPC server. Needs the patched modules, so it only builds with
// the pushdown tag in the wrapper module scripts/kube-build-pushdown.sh
// makes, which runs it before building kube-apiserver.
package pushdown

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	labels = "app=web,tier in (a,b)"
	fields = "metadata.name=x,status.phase!=Failed"
)

// field appends a length-delimited field, as protoc would encode it.
func field(b []byte, num protowire.Number, v string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, v)
}

// grpcBytes marshals m with gRPC's own proto codec, which is what goes on
// the wire.
func grpcBytes(t *testing.T, m any) []byte {
	t.Helper()
	data, err := encoding.GetCodecV2("proto").Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return data.Materialize()
}

func TestRangeRequestWire(t *testing.T) {
	req := &pb.RangeRequest{Key: []byte("/registry/pods/"), Limit: 5, LabelSelector: labels, FieldSelector: fields}
	want := field(nil, 1, "/registry/pods/")
	want = protowire.AppendTag(want, 3, protowire.VarintType)
	want = protowire.AppendVarint(want, 5)
	want = field(want, 14, labels)
	want = field(want, 15, fields)
	if want[len(want)-len(fields)-len(labels)-4] != 0x72 {
		t.Fatalf("field 14 tag is not 0x72: % x", want)
	}
	got, err := req.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Marshal:\n got % x\nwant % x", got, want)
	}
	if req.Size() != len(want) {
		t.Fatalf("Size %d, want %d", req.Size(), len(want))
	}
	if g := grpcBytes(t, req); !bytes.Equal(g, want) {
		t.Fatalf("gRPC codec:\n got % x\nwant % x", g, want)
	}
	var back pb.RangeRequest
	if err := back.Unmarshal(got); err != nil {
		t.Fatal(err)
	}
	if back.GetLabelSelector() != labels || back.GetFieldSelector() != fields || back.Limit != 5 ||
		string(back.Key) != "/registry/pods/" || back.XXX_unrecognized != nil {
		t.Fatalf("Unmarshal: %+v", back)
	}
}

func TestWatchCreateRequestWire(t *testing.T) {
	req := &pb.WatchCreateRequest{Key: []byte("/registry/pods/"), Fragment: true, LabelSelector: labels, FieldSelector: fields}
	want := field(nil, 1, "/registry/pods/")
	want = protowire.AppendTag(want, 8, protowire.VarintType)
	want = protowire.AppendVarint(want, 1)
	want = field(want, 9, labels)
	want = field(want, 10, fields)
	got, err := req.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) || req.Size() != len(want) {
		t.Fatalf("Marshal (Size %d):\n got % x\nwant % x", req.Size(), got, want)
	}
	wrapped := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: req}}
	if g := grpcBytes(t, wrapped); !bytes.Contains(g, want) {
		t.Fatalf("gRPC codec: % x lacks % x", g, want)
	}
	var back pb.WatchCreateRequest
	if err := back.Unmarshal(got); err != nil {
		t.Fatal(err)
	}
	if back.GetLabelSelector() != labels || back.GetFieldSelector() != fields || !back.Fragment || back.XXX_unrecognized != nil {
		t.Fatalf("Unmarshal: %+v", back)
	}
}

// server records the requests it gets.
type server struct {
	pb.UnimplementedKVServer
	pb.UnimplementedWatchServer
	ranges  chan *pb.RangeRequest
	creates chan *pb.WatchCreateRequest
}

func (s *server) Range(_ context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	s.ranges <- r
	return &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 1}}, nil
}

func (s *server) Watch(stream pb.Watch_WatchServer) error {
	for {
		r, err := stream.Recv()
		if err != nil {
			return err
		}
		if c := r.GetCreateRequest(); c != nil {
			s.creates <- c
			if err := stream.Send(&pb.WatchResponse{Header: &pb.ResponseHeader{Revision: 1}, Created: true}); err != nil {
				return err
			}
		}
	}
}

func TestClientSendsSelectors(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &server{ranges: make(chan *pb.RangeRequest, 4), creates: make(chan *pb.WatchCreateRequest, 4)}
	g := grpc.NewServer()
	pb.RegisterKVServer(g, srv)
	pb.RegisterWatchServer(g, srv)
	go g.Serve(lis)
	defer g.Stop()

	client, err := kubernetes.New(clientv3.Config{Endpoints: []string{lis.Addr().String()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, opts := range []kubernetes.ListOptions{{Limit: 3}, {Limit: 3, LabelSelector: labels, FieldSelector: fields}} {
		if _, err := client.Kubernetes.List(ctx, "/registry/pods/", opts); err != nil {
			t.Fatal(err)
		}
		r := <-srv.ranges
		if r.LabelSelector != opts.LabelSelector || r.FieldSelector != opts.FieldSelector || r.Limit != 3 {
			t.Fatalf("List(%+v) sent %+v", opts, r)
		}
	}

	for _, sel := range [][2]string{{"", ""}, {labels, fields}} {
		wctx, wcancel := context.WithCancel(ctx)
		client.Watch(wctx, "/registry/pods/", clientv3.WithPrefix(), clientv3.WithPrevKV(),
			clientv3.WithLabelSelector(sel[0]), clientv3.WithFieldSelector(sel[1]))
		select {
		case c := <-srv.creates:
			if c.LabelSelector != sel[0] || c.FieldSelector != sel[1] || !c.PrevKv {
				t.Fatalf("Watch(%q) sent %+v", sel, c)
			}
		case <-ctx.Done():
			t.Fatal("no watch create request")
		}
		wcancel()
	}
}
