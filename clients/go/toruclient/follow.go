package toruclient

// Followers: WatchEvents and StreamLogs streams that resume by seq and cursor when the
// daemon ends them (an upgrade ends them with UNAVAILABLE, "the daemon is upgrading"; a
// stop ends them cleanly) or the connection fails, so that a daemon upgrade or restart
// neither loses nor repeats anything.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	torupb "github.com/toru-project/torud/clients/go/torupb/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// DefaultReconnectWindow is how long a follower keeps trying to reconnect, without the
// daemon answering, before Recv returns the last error.
const DefaultReconnectWindow = 30 * time.Second

// FollowOptions tune FollowEvents and FollowLogs.
type FollowOptions struct {
	// ReconnectWindow: give up once this long has passed since the stream failed without
	// the daemon answering a reconnect; zero means DefaultReconnectWindow.
	ReconnectWindow time.Duration
}

// Follower is a resuming server stream: Recv returns its messages like the generated
// stream's Recv, reconnecting (with backoff, 50 ms doubling to 1 s) whenever the stream
// ends with UNAVAILABLE, ends cleanly or its connection fails, until the reconnect window
// passes without the daemon answering. Any other status, and the context's end, is
// returned at once; after an error Recv keeps returning it. Cancel the context to stop.
type Follower[T any] struct {
	ctx    context.Context
	retry  retry
	open   func(context.Context) (grpc.ServerStreamingClient[T], error)
	accept func(*T) *T // what of a message to return (nil: nothing), recording it as seen
	stream grpc.ServerStreamingClient[T]
	cancel context.CancelFunc
	err    error
}

// Recv returns the next message; see Follower.
func (f *Follower[T]) Recv() (*T, error) {
	for f.err == nil {
		if f.stream == nil {
			ctx, cancel := context.WithCancel(f.ctx)
			stream, err := f.open(ctx)
			if err != nil {
				cancel()
				f.err = f.retry.failed(f.ctx, err)
				continue
			}
			// Headers mean the daemon answered (a trailers-only error has none).
			if md, err := stream.Header(); err == nil && md != nil {
				f.retry.answered()
			}
			f.stream, f.cancel = stream, cancel
		}
		msg, err := f.stream.Recv()
		if err != nil {
			f.cancel()
			f.stream = nil
			if errors.Is(err, io.EOF) {
				err = nil // ended cleanly: the daemon stopped
			}
			f.err = f.retry.failed(f.ctx, err)
			continue
		}
		f.retry.progress()
		if out := f.accept(msg); out != nil {
			return out, nil
		}
	}
	return nil, f.err
}

// FollowEvents follows WatchEvents from req (nil: only new events) and, on resuming,
// asks for the events after the seq of the last event (or gap end) it returned, so each
// event is returned once, in order. Gaps are returned as the daemon sends them. Without
// AfterSeq and before any event, a resumed stream again starts at "now".
func (c *Client) FollowEvents(ctx context.Context, req *torupb.WatchEventsRequest, opts FollowOptions) *Follower[torupb.WatchEventsResponse] {
	var last *uint64
	var pluginIDs []string
	if req != nil {
		if req.AfterSeq != nil {
			last = proto.Uint64(req.GetAfterSeq())
		}
		pluginIDs = req.GetPluginIds()
	}
	return &Follower[torupb.WatchEventsResponse]{
		ctx:   ctx,
		retry: newRetry(opts),
		open: func(ctx context.Context) (grpc.ServerStreamingClient[torupb.WatchEventsResponse], error) {
			resumed := &torupb.WatchEventsRequest{PluginIds: pluginIDs}
			if last != nil {
				resumed.AfterSeq = proto.Uint64(*last)
			}
			return c.Plugins.WatchEvents(ctx, resumed)
		},
		accept: func(r *torupb.WatchEventsResponse) *torupb.WatchEventsResponse {
			var end uint64
			switch {
			case r.GetGap() != nil:
				end = r.GetGap().GetLastSeq()
			case r.GetEvent() != nil:
				end = r.GetEvent().GetSeq()
			default:
				return nil
			}
			if last != nil && end <= *last {
				return nil // returned already
			}
			last = &end
			return r
		},
	}
}

type logCursor struct {
	seq    uint64
	known  bool // false for a start cursor whose seq did not parse
	cursor string
}

// FollowLogs follows StreamLogs from req (Follow is set for you) and, on resuming, sends
// AfterCursors holding, per plugin, the last record (or gap end) it returned, so each
// record is returned once, in order per plugin. Batches are returned as received, less
// records returned already; gaps are returned as the daemon sends them.
//
// Plugins not seen yet when it resumes: with an AfterCursors start they keep their
// cursor; with Tail, Since or "now" they start at the reconnect (the API cannot combine
// cursors with another start), so what such a plugin logged while the stream was down is
// not sent.
func (c *Client) FollowLogs(ctx context.Context, req *torupb.StreamLogsRequest, opts FollowOptions) *Follower[torupb.StreamLogsResponse] {
	first := &torupb.StreamLogsRequest{}
	if req != nil {
		first = proto.Clone(req).(*torupb.StreamLogsRequest)
	}
	first.Follow = true
	filter := first.GetFilter()
	cursors := map[string]logCursor{}
	for _, cursor := range first.GetAfterCursors().GetCursors() {
		plugin, seq, _ := cutLast(cursor, ":")
		n, err := strconv.ParseUint(seq, 10, 64)
		cursors[plugin] = logCursor{seq: n, known: err == nil, cursor: cursor}
	}
	newer := func(plugin string, seq uint64) bool {
		c, ok := cursors[plugin]
		return !ok || !c.known || seq > c.seq
	}
	return &Follower[torupb.StreamLogsResponse]{
		ctx:   ctx,
		retry: newRetry(opts),
		open: func(ctx context.Context) (grpc.ServerStreamingClient[torupb.StreamLogsResponse], error) {
			resumed := first
			if resumed == nil {
				list := make([]string, 0, len(cursors))
				for _, c := range cursors {
					list = append(list, c.cursor)
				}
				resumed = &torupb.StreamLogsRequest{
					Filter: filter,
					Start:  &torupb.StreamLogsRequest_AfterCursors{AfterCursors: &torupb.Cursors{Cursors: list}},
					Follow: true,
				}
			}
			first = nil
			return c.Logs.StreamLogs(ctx, resumed)
		},
		accept: func(r *torupb.StreamLogsResponse) *torupb.StreamLogsResponse {
			out := &torupb.StreamLogsResponse{}
			if gap := r.GetGap(); gap != nil && newer(gap.GetPluginId(), gap.GetToSeq()) {
				id := gap.GetPluginId()
				cursors[id] = logCursor{seq: gap.GetToSeq(), known: true, cursor: fmt.Sprintf("%s:%d", id, gap.GetToSeq())}
				out.Gap = gap
			}
			for _, record := range r.GetRecords() {
				if newer(record.GetPluginId(), record.GetSeq()) {
					cursors[record.GetPluginId()] = logCursor{seq: record.GetSeq(), known: true, cursor: record.GetCursor()}
					out.Records = append(out.Records, record)
				}
			}
			if len(out.Records) == 0 && out.Gap == nil {
				return nil
			}
			return out
		},
	}
}

func cutLast(s, sep string) (before, after string, found bool) {
	if i := strings.LastIndex(s, sep); i >= 0 {
		return s[:i], s[i+len(sep):], true
	}
	return s, "", false
}

// retry is the followers' reconnect policy.
type retry struct {
	window, delay time.Duration
	failingSince  time.Time
}

func newRetry(opts FollowOptions) retry {
	window := opts.ReconnectWindow
	if window == 0 {
		window = DefaultReconnectWindow
	}
	return retry{window: window, delay: 50 * time.Millisecond}
}

// answered: the daemon answered a (re)connect, so the window starts again.
func (r *retry) answered() { r.failingSince = time.Time{} }

func (r *retry) progress() {
	r.failingSince = time.Time{}
	r.delay = 50 * time.Millisecond
}

// failed returns nil after the backoff when the stream may be resumed (err is nil for a
// clean end), else the error to give up with.
func (r *retry) failed(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil && status.Code(err) != codes.Unavailable {
		return err
	}
	now := time.Now()
	if r.failingSince.IsZero() {
		r.failingSince = now
	}
	left := r.window - now.Sub(r.failingSince)
	if left <= 0 {
		if err == nil {
			err = fmt.Errorf("the stream ended and could not be resumed within %v", r.window)
		}
		return err
	}
	timer := time.NewTimer(min(r.delay, left))
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
	}
	r.delay = min(r.delay*2, time.Second)
	return nil
}
