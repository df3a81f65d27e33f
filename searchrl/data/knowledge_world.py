"""The Knowledge World: a synthetic, seeded benchmark where every hop's knowledge source is known.

Fictional people, companies and works (generated pronounceable names, every name word used once)
are tied to real countries whose capital, official language, currency and continent a small
instruct model may already know. Hence each hop of each question is either

- internal: a real fact the base policy answers correctly closed-book (the prepare-stage probe), or
- external: a fictional fact, or a real fact the policy does not know; it is only in the corpus.

Relations
    person  born_in          -> country      company founded_in       -> year
    person  works_for        -> company      company headquartered_in -> country
    work    written_by       -> person       company founded_by       -> person
    work    published_in     -> year         country capital / official_language / currency / continent

Corpus: one passage per entity stating its facts in prose (the gold passage of each of its facts),
one passage per country stating its real facts (so an unknown real fact can be searched), and
distractor passages about the same entities that state nothing a question asks.

Question types (mixed by `question_mix`):   optimal retrievals
    real_1hop              capital of a country                 0 if known, else 1
    fictional_1hop         where was X born                     1
    bridge_fictional_real  capital of the country where X ...   1 + (0|1)
    fictional_2hop         founding year of X's employer        2
    comparison             which company was founded earlier    2
    mixed_3hop             language of the country where the author of W was born   2 + (0|1)

Splits: `train`; `eval`, entity-disjoint (the fictional entities are split into two pools before any
relation is drawn, and each pool only links to itself; real_1hop questions use disjoint countries);
`seen`, 1-hop questions in new wording about the external facts of training hops (closed-book they
measure memorization).

Everything is a pure function of (config, seed); the probe is a pure function of an `answer_fn`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from searchrl.data.schema import Passage, QARecord
from searchrl.errors import ConfigError, InputError

log = logging.getLogger(__name__)

DATASET = "knowledge_world"
QTYPES = ("real_1hop", "fictional_1hop", "bridge_fictional_real", "fictional_2hop", "comparison", "mixed_3hop")
REAL_RELATIONS = ("capital", "official_language", "currency", "continent")
AnswerFn = Callable[[list[str]], list[str]]


# ----------------------------------------------------------------------------- real-world table
@dataclass(frozen=True)
class Country:
    name: str
    aliases: tuple[str, ...]
    capital: tuple[str, ...]  # first item: the form written in the corpus; the rest: accepted aliases
    official_language: tuple[str, ...]
    currency: tuple[str, ...]
    continent: tuple[str, ...]

    def fact(self, relation: str) -> tuple[str, ...]:
        return getattr(self, relation)


def _c(name, aliases, capital, language, currency, continent) -> Country:
    t = lambda v: (v,) if isinstance(v, str) else tuple(v)  # noqa: E731
    return Country(name, (name, *t(aliases)), t(capital), t(language), t(currency), t(continent))


# Countries with one clear capital and one clear official language, well known to instruct models.
# Aliases are what a correct closed-book answer may say. The country's own name is never an alias (an
# answer that restates the question would "cover" it), nor is an ISO currency code (wrong answers of a
# small model often append one: "the Spanish dollar (EUR)").
COUNTRIES: tuple[Country, ...] = (
    _c("France", (), "Paris", "French", "euro", "Europe"),
    _c("Germany", (), "Berlin", "German", "euro", "Europe"),
    _c("Italy", (), "Rome", "Italian", "euro", "Europe"),
    _c("Spain", (), "Madrid", "Spanish", "euro", "Europe"),
    _c("Portugal", (), "Lisbon", "Portuguese", "euro", "Europe"),
    _c("United Kingdom", ("UK", "U.K.", "Britain", "Great Britain"), "London", "English",
       ("pound sterling", "pound", "British pound", "sterling"), "Europe"),
    _c("Netherlands", ("The Netherlands", "Holland"), "Amsterdam", "Dutch", "euro", "Europe"),
    _c("Sweden", (), "Stockholm", "Swedish", ("Swedish krona", "krona"), "Europe"),
    _c("Norway", (), "Oslo", "Norwegian", ("Norwegian krone", "krone"), "Europe"),
    _c("Denmark", (), "Copenhagen", "Danish", ("Danish krone", "krone"), "Europe"),
    _c("Poland", (), "Warsaw", "Polish", ("złoty", "zloty", "Polish zloty"), "Europe"),
    _c("Greece", (), "Athens", "Greek", "euro", "Europe"),
    _c("Austria", (), "Vienna", "German", "euro", "Europe"),
    _c("Hungary", (), "Budapest", "Hungarian", ("forint", "Hungarian forint"), "Europe"),
    _c("Czech Republic", ("Czechia",), "Prague", "Czech", ("Czech koruna", "koruna"), "Europe"),
    _c("Romania", (), "Bucharest", "Romanian", ("Romanian leu", "leu"), "Europe"),
    _c("Ukraine", (), ("Kyiv", "Kiev"), "Ukrainian", ("hryvnia", "hryvnya"), "Europe"),
    _c("Iceland", (), ("Reykjavík", "Reykjavik"), "Icelandic", ("Icelandic króna", "króna", "krona"),
       "Europe"),
    _c("Russia", ("Russian Federation",), "Moscow", "Russian", ("Russian ruble", "ruble", "rouble"),
       ("Europe and Asia", "Europe", "Asia", "Eurasia")),
    _c("Japan", (), "Tokyo", "Japanese", ("yen", "Japanese yen"), "Asia"),
    _c("China", ("People's Republic of China", "PRC"), ("Beijing", "Peking"),
       ("Mandarin Chinese", "Chinese", "Mandarin", "Standard Chinese"),
       ("renminbi", "yuan", "Chinese yuan"), "Asia"),
    _c("South Korea", ("Korea", "Republic of Korea"), "Seoul", "Korean", ("South Korean won", "won"), "Asia"),
    _c("Thailand", (), "Bangkok", "Thai", ("baht", "Thai baht"), "Asia"),
    _c("Vietnam", ("Viet Nam",), "Hanoi", "Vietnamese", ("Vietnamese dong", "dong", "đồng"), "Asia"),
    _c("Indonesia", (), "Jakarta", ("Indonesian", "Bahasa Indonesia"), ("Indonesian rupiah", "rupiah"),
       "Asia"),
    _c("Turkey", ("Türkiye", "Turkiye"), "Ankara", "Turkish", ("Turkish lira", "lira"), ("Asia", "Europe")),
    _c("Iran", (), "Tehran", ("Persian", "Farsi"), ("Iranian rial", "rial"), "Asia"),
    _c("Saudi Arabia", (), "Riyadh", "Arabic", ("Saudi riyal", "riyal"), "Asia"),
    _c("Bangladesh", (), "Dhaka", ("Bengali", "Bangla"), ("Bangladeshi taka", "taka"), "Asia"),
    _c("Egypt", (), "Cairo", "Arabic", ("Egyptian pound", "pound"), "Africa"),
    _c("Nigeria", (), "Abuja", "English", ("Nigerian naira", "naira"), "Africa"),
    _c("Ghana", (), "Accra", "English", ("Ghanaian cedi", "cedi"), "Africa"),
    _c("Algeria", (), "Algiers", "Arabic", ("Algerian dinar", "dinar"), "Africa"),
    _c("Ethiopia", (), "Addis Ababa", "Amharic", ("Ethiopian birr", "birr"), "Africa"),
    _c("United States", ("USA", "US", "U.S.", "United States of America", "America"),
       ("Washington, D.C.", "Washington", "Washington DC"), "English",
       ("US dollar", "dollar", "United States dollar"), "North America"),
    _c("Mexico", (), "Mexico City", "Spanish", ("Mexican peso", "peso"), "North America"),
    _c("Cuba", (), "Havana", "Spanish", ("Cuban peso", "peso"), "North America"),
    _c("Brazil", (), ("Brasília", "Brasilia"), "Portuguese", ("Brazilian real", "real"), "South America"),
    _c("Argentina", (), "Buenos Aires", "Spanish", ("Argentine peso", "peso"), "South America"),
    _c("Chile", (), "Santiago", "Spanish", ("Chilean peso", "peso"), "South America"),
    _c("Peru", (), "Lima", "Spanish", ("Peruvian sol", "sol"), "South America"),
    _c("Colombia", (), ("Bogotá", "Bogota"), "Spanish", ("Colombian peso", "peso"), "South America"),
    _c("Venezuela", (), "Caracas", "Spanish", ("Venezuelan bolívar", "bolívar", "bolivar"), "South America"),
    _c("Australia", (), "Canberra", "English", ("Australian dollar", "dollar"), "Oceania"),
    _c("New Zealand", (), "Wellington", "English", ("New Zealand dollar", "dollar"), ("Oceania", "Australasia")),
)


ARTICLE_COUNTRIES = {"United Kingdom", "Netherlands", "Czech Republic", "United States"}  # "the United States"


# ----------------------------------------------------------------------------- wording
# 1-hop question templates per relation ({s} = the subject). A `seen` question uses a template
# that no training question used for the same fact.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "born_in": ("In which country was {s} born?", "What is the birth country of {s}?",
                "{s} was born in which country?", "What country is {s} originally from?"),
    "works_for": ("Which company does {s} work for?", "Who is the employer of {s}?",
                  "{s} is employed by which company?"),
    "founded_in": ("In what year was {s} founded?", "When was {s} founded?", "{s} was established in which year?"),
    "headquartered_in": ("In which country is {s} headquartered?", "In what country are the headquarters of {s}?",
                         "{s} has its headquarters in which country?"),
    "founded_by": ("Who founded {s}?", "Who is the founder of {s}?", "{s} was founded by whom?"),
    "written_by": ("Who wrote {s}?", "Who is the author of {s}?", "{s} was written by whom?"),
    "published_in": ("In what year was {s} published?", "When was {s} first published?",
                     "{s} came out in which year?"),
    "capital": ("What is the capital of {s}?", "Which city is the capital of {s}?",
                "{s} has which city as its capital?"),
    "official_language": ("What is the official language of {s}?", "Which language is official in {s}?",
                          "What language is officially spoken in {s}?"),
    "currency": ("What is the currency of {s}?", "Which currency is used in {s}?", "What money is used in {s}?"),
    "continent": ("On which continent is {s}?", "{s} is located on which continent?",
                  "Which continent is {s} part of?"),
}
PROBE_TEMPLATE_INDEX = 0  # the closed-book probe asks the first wording

# Noun phrases naming the object of a relation, for bridges ("the country where X was born").
# Phrases starting with "{s}" (possessives) are only used when the subject is a plain name.
PHRASES: dict[str, tuple[str, ...]] = {
    "born_in": ("the country where {s} was born", "the birth country of {s}", "{s}'s country of birth"),
    "works_for": ("the company that {s} works for", "the employer of {s}", "{s}'s employer"),
    "headquartered_in": ("the country where {s} is headquartered", "the country that hosts the headquarters of {s}"),
    "founded_by": ("the founder of {s}", "the person who founded {s}"),
    "written_by": ("the author of {s}", "the person who wrote {s}"),
}

RELATIONS = {  # relation -> (subject kind, object kind)
    "born_in": ("person", "country"), "works_for": ("person", "company"),
    "founded_in": ("company", "year"), "headquartered_in": ("company", "country"), "founded_by": ("company", "person"),
    "written_by": ("work", "person"), "published_in": ("work", "year"),
    **{r: ("country", "value") for r in REAL_RELATIONS},
}
KIND_RELATIONS = {kind: tuple(r for r, (k, _) in RELATIONS.items() if k == kind)
                  for kind in ("person", "company", "work", "country")}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------- names
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "dr", "gr", "kr", "st", "tr", "th", "sh")
_INNER_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "a", "i")
_DIGRAPHS = ("ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "v", "sh")
COMPANY_SUFFIXES = ("Industries", "Systems", "Labs", "Holdings", "Group", "Dynamics", "Works", "Foods", "Motors",
                    "Analytics", "Textiles", "Logistics")
WORK_PATTERNS = ("The {w} Letters", "The {w} Chronicle", "Songs of {w}", "The {w} Garden", "Winter in {w}",
                 "The {w} Archive", "A Voyage to {w}", "The Lanterns of {w}", "The {w} Orchard", "Echoes of {w}")
OCCUPATIONS = ("engineer", "chemist", "novelist", "economist", "architect", "physician", "historian",
               "designer", "geologist", "translator", "accountant", "mathematician")


class NameGenerator:
    """Pronounceable invented words, each used once, never a word of the real-world table."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()
        for c in COUNTRIES:
            for values in (c.aliases, c.capital, c.official_language, c.currency, c.continent):
                for v in values:
                    self.used.update(w.lower() for w in v.replace(",", " ").split())
        for words in (COMPANY_SUFFIXES, WORK_PATTERNS, OCCUPATIONS):
            for w in words:
                self.used.update(x.lower() for x in w.split())

    def word(self, min_syl: int = 2, max_syl: int = 3) -> str:
        rng = self.rng
        for _ in range(10_000):
            n = rng.randint(min_syl, max_syl)
            parts = []
            for k in range(n):
                onset = rng.choice(_ONSETS if k == 0 else _INNER_ONSETS)
                vowel = rng.choice(_DIGRAPHS) if rng.random() < 0.1 else rng.choice(_VOWELS)
                parts.append(onset + vowel)
            w = "".join(parts) + rng.choice(_CODAS)
            if not 4 <= len(w) <= 9 or w in self.used:
                continue
            self.used.add(w)
            return w.capitalize()
        raise RuntimeError("name space exhausted")  # unreachable for any sane world size


# ----------------------------------------------------------------------------- world model
@dataclass
class Entity:
    id: str
    kind: str  # person | company | work | country
    name: str
    aliases: list[str]
    pool: str  # train | eval | real (countries)
    mention: str = ""  # how running text names it ("the United States"); default: the name

    def __post_init__(self):
        self.mention = self.mention or self.name


@dataclass
class Fact:
    id: str  # "<subject id>:<relation>"
    subject: str  # entity id
    relation: str
    object: str  # the surface form written in the gold passage
    answers: list[str]  # accepted answers (object first)
    object_id: str | None  # entity id when the object is an entity
    passage_id: str
    real: bool


@dataclass
class World:
    entities: dict[str, Entity]
    facts: dict[str, Fact]
    passages: list[Passage]
    countries: list[Country]

    def fact(self, subject: str, relation: str) -> Fact:
        return self.facts[f"{subject}:{relation}"]

    def pool(self, kind: str, pool: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind and e.pool == pool]

    def real_facts(self) -> list[Fact]:
        return [f for f in self.facts.values() if f.real]


def _split_count(n: int, fraction: float) -> int:
    """Entities of a kind that go to the eval pool: >= 1, and >= 1 left for train."""
    return min(max(1, round(n * fraction)), n - 1)


def build_world(cfg, seed: int) -> World:
    """Entities, facts and passages from a KnowledgeWorldCfg; deterministic by seed."""
    rng = random.Random(f"knowledge-world/{seed}")
    names = NameGenerator(rng)
    countries = list(COUNTRIES)
    if cfg.n_countries:
        if cfg.n_countries > len(COUNTRIES):
            raise ConfigError(f"prepare.knowledge_world.n_countries: {cfg.n_countries} is more than the "
                              f"{len(COUNTRIES)} built-in countries (0 = all)")
        countries = sorted(rng.sample(countries, cfg.n_countries), key=COUNTRIES.index)

    entities: dict[str, Entity] = {}
    for c in countries:
        cid = country_id(c)
        entities[cid] = Entity(cid, "country", c.name, list(c.aliases), "real",
                               f"the {c.name}" if c.name in ARTICLE_COUNTRIES else c.name)

    def add(kind: str, n: int, make_name: Callable[[], tuple[str, list[str]]]) -> None:
        n_eval = _split_count(n, cfg.eval_entity_fraction)
        pools = ["eval"] * n_eval + ["train"] * (n - n_eval)
        rng.shuffle(pools)
        for i, pool in enumerate(pools):
            name, aliases = make_name()
            eid = f"{kind}-{i:03d}"
            entities[eid] = Entity(eid, kind, name, aliases, pool)

    def person_name():
        first, last = names.word(2, 2), names.word(2, 3)
        return f"{first} {last}", [f"{first} {last}"]

    def company_name():
        stem = names.word(2, 3)
        name = f"{stem} {rng.choice(COMPANY_SUFFIXES)}"
        return name, [name, stem]

    def work_name():
        title = rng.choice(WORK_PATTERNS).format(w=names.word(2, 3))
        return title, [title] + ([title[4:]] if title.startswith("The ") else [])

    add("person", cfg.n_people, person_name)
    add("company", cfg.n_companies, company_name)
    add("work", cfg.n_works, work_name)

    facts: dict[str, Fact] = {}

    def link(subject: Entity, relation: str, obj: Entity | int, passage_id: str) -> None:
        if isinstance(obj, Entity):
            f = Fact(f"{subject.id}:{relation}", subject.id, relation, obj.name, list(obj.aliases), obj.id,
                     passage_id, real=False)
        else:
            f = Fact(f"{subject.id}:{relation}", subject.id, relation, str(obj), [str(obj)], None, passage_id,
                     real=False)
        facts[f.id] = f

    country_entities = [entities[country_id(c)] for c in countries]
    for pool in ("train", "eval"):
        people = [e for e in entities.values() if e.kind == "person" and e.pool == pool]
        companies = [e for e in entities.values() if e.kind == "company" and e.pool == pool]
        works = [e for e in entities.values() if e.kind == "work" and e.pool == pool]
        for p in people:
            link(p, "born_in", rng.choice(country_entities), passage_id(p))
            link(p, "works_for", rng.choice(companies), passage_id(p))
        company_years = rng.sample(range(1850, 2016), len(companies))
        for c, year in zip(companies, company_years, strict=True):
            link(c, "founded_in", year, passage_id(c))
            link(c, "headquartered_in", rng.choice(country_entities), passage_id(c))
            link(c, "founded_by", rng.choice(people), passage_id(c))
        work_years = rng.sample(range(1900, 2023), len(works))
        for w, year in zip(works, work_years, strict=True):
            link(w, "written_by", rng.choice(people), passage_id(w))
            link(w, "published_in", year, passage_id(w))
    for c in countries:
        cid = country_id(c)
        for r in REAL_RELATIONS:
            values = c.fact(r)
            facts[f"{cid}:{r}"] = Fact(f"{cid}:{r}", cid, r, values[0], list(values), None, passage_id(cid), True)

    world = World(entities, facts, [], countries)
    world.passages = _passages(world, rng)
    return world


def country_id(c: Country) -> str:
    return "country-" + c.name.lower().replace(" ", "_")


def passage_id(entity: Entity | str) -> str:
    return f"kw-{entity.id if isinstance(entity, Entity) else entity}"


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _later(rng: random.Random, year: int, last: int = 2024) -> int:
    return year + rng.randint(1, max(1, min(40, last - year)))


def _passages(world: World, rng: random.Random) -> list[Passage]:
    E, F = world.entities, world.fact
    out: list[Passage] = []
    for e in world.entities.values():
        if e.kind == "person":
            born, job = E[F(e.id, "born_in").object_id].mention, F(e.id, "works_for").object
            last = e.name.split()[-1]
            occupation = rng.choice(OCCUPATIONS)
            text = rng.choice((
                f"{e.name} is {_a(occupation)} who was born in {born}. {last} works for {job}.",
                f"Born in {born}, {e.name} trained as {_a(occupation)}. Today {last} is employed by {job}.",
                f"{e.name} ({occupation}) was born in {born} and currently works for {job}, "
                f"where {last} leads a small team.",
            ))
        elif e.kind == "company":
            year, founder = F(e.id, "founded_in").object, F(e.id, "founded_by").object
            hq = E[F(e.id, "headquartered_in").object_id].mention
            text = rng.choice((
                f"{e.name} is a company founded in {year} by {founder}. It is headquartered in {hq}.",
                f"Founded by {founder} in {year}, {e.name} has its headquarters in {hq}.",
                f"{e.name} was established in {year}. The company, headquartered in {hq}, "
                f"was founded by {founder}.",
            ))
        elif e.kind == "work":
            author, year = F(e.id, "written_by").object, F(e.id, "published_in").object
            text = rng.choice((
                f"{e.name} is a novel written by {author}. It was first published in {year}.",
                f"Published in {year}, {e.name} is a book by {author}.",
                f"{author} wrote {e.name}, which was published in {year} to wide acclaim.",
            ))
        else:
            cap, lang, cur, cont = (F(e.id, r).object for r in REAL_RELATIONS)
            text = (f"{_cap(e.mention)} is a country in {cont}. Its capital city is {cap.rstrip('.')}. The official language "
                    f"of {e.mention} is {lang}, and its currency is the {cur}.")
        out.append(Passage(passage_id(e), e.name, text, DATASET))

    # Distractors: same titles as gold passages, true but unasked facts (hard negatives).
    countries = [E[country_id(c)] for c in world.countries]
    fictional = [e for e in world.entities.values() if e.kind != "country"]
    n_distractors = len(fictional) // 2
    for i, e in enumerate(rng.sample(fictional, n_distractors)):
        if e.kind == "person":
            home = F(e.id, "born_in").object
            other = rng.choice([c for c in countries if c.name != home] or countries).mention
            text = rng.choice((f"In a recent interview, {e.name} described a long research stay in {other}.",
                               f"{e.name} gave the keynote lecture at a conference held in {other}."))
        elif e.kind == "company":
            hq, year = F(e.id, "headquartered_in").object, int(F(e.id, "founded_in").object)
            other = rng.choice([c for c in countries if c.name != hq] or countries).mention
            text = f"{e.name} opened a regional sales office in {other} in {_later(rng, year)}."
        else:
            year = int(F(e.id, "published_in").object)
            other = rng.choice(countries).mention
            text = (f"A stage adaptation of {e.name} premiered in {other} in {_later(rng, year)}, "
                    f"years after the book first appeared.")
        out.append(Passage(f"kw-distractor-{i:04d}", e.name, text, DATASET))
    return out


# ----------------------------------------------------------------------------- questions
@dataclass
class Question:
    qtype: str
    text: str
    answers: list[str]
    facts: list[Fact]  # hop chain, in reasoning order
    key: tuple  # identity of the question (no two in a split share it)
    one_hop_template: tuple[str, int] | None = None  # (fact id, template index) of a plain 1-hop question
    extra: dict = field(default_factory=dict)


class _Builder:
    """Draws questions of each type from one entity pool."""

    def __init__(self, world: World, pool: str, countries: list[Entity], rng: random.Random):
        self.w, self.rng, self.countries = world, rng, countries
        self.people = world.pool("person", pool)
        self.companies = world.pool("company", pool)
        self.works = world.pool("work", pool)

    def _template(self, relation: str, subject: str) -> tuple[str, int]:
        i = self.rng.randrange(len(QUESTION_TEMPLATES[relation]))
        return _cap(QUESTION_TEMPLATES[relation][i].format(s=subject)), i

    def _phrase(self, relation: str, subject: str, nested: bool) -> str:
        options = [p for p in PHRASES[relation] if not (nested and p.startswith("{s}"))]
        return self.rng.choice(options).format(s=subject)

    def _chain_question(self, chain: list[Fact], qtype: str) -> Question:
        """Ask the last fact of `chain` about the subject described through the earlier facts."""
        subject = self.w.entities[chain[0].subject].mention
        for i, f in enumerate(chain[:-1]):
            subject = self._phrase(f.relation, subject, nested=i > 0)
        last = chain[-1]
        options = [t for t in QUESTION_TEMPLATES[last.relation] if not t.startswith("{s}")] or \
            list(QUESTION_TEMPLATES[last.relation])
        text = _cap(self.rng.choice(options).format(s=subject))
        return Question(qtype, text, list(last.answers), chain, (qtype, tuple(f.id for f in chain)))

    def real_1hop(self) -> Question | None:
        if not self.countries:
            return None
        c = self.rng.choice(self.countries)
        f = self.w.fact(c.id, self.rng.choice(REAL_RELATIONS))
        text, t = self._template(f.relation, c.mention)
        return Question("real_1hop", text, list(f.answers), [f], ("1hop", f.id), (f.id, t))

    def fictional_1hop(self) -> Question | None:
        e = self.rng.choice(self.people + self.companies + self.works)
        f = self.w.fact(e.id, self.rng.choice(KIND_RELATIONS[e.kind]))
        text, t = self._template(f.relation, e.name)
        return Question("fictional_1hop", text, list(f.answers), [f], ("1hop", f.id), (f.id, t))

    def _to_country(self) -> Fact:
        """A fictional fact whose object is a country (a person's birth country or a company's HQ)."""
        if self.rng.random() < 0.5:
            return self.w.fact(self.rng.choice(self.people).id, "born_in")
        return self.w.fact(self.rng.choice(self.companies).id, "headquartered_in")

    def bridge_fictional_real(self) -> Question | None:
        first = self._to_country()
        second = self.w.fact(first.object_id, self.rng.choice(REAL_RELATIONS))
        return self._chain_question([first, second], "bridge_fictional_real")

    def _to_entity(self) -> Fact:
        """A fictional fact whose object is a fictional entity (employer, founder, author)."""
        kind = self.rng.choice(("person", "company", "work"))
        if kind == "person":
            return self.w.fact(self.rng.choice(self.people).id, "works_for")
        if kind == "company":
            return self.w.fact(self.rng.choice(self.companies).id, "founded_by")
        return self.w.fact(self.rng.choice(self.works).id, "written_by")

    def fictional_2hop(self) -> Question | None:
        first = self._to_entity()
        obj = self.w.entities[first.object_id]
        relations = [r for r in KIND_RELATIONS[obj.kind]
                     if self.w.fact(obj.id, r).object_id != first.subject]  # no loop back to the subject
        second = self.w.fact(obj.id, self.rng.choice(relations))
        return self._chain_question([first, second], "fictional_2hop")

    def comparison(self) -> Question | None:
        options = []
        if len(self.companies) >= 2:
            options.append(("founded_in", self.companies))
        if len(self.works) >= 2:
            options.append(("published_in", self.works))
        if not options:
            return None
        relation, pool = self.rng.choice(options)
        a, b = self.rng.sample(pool, 2)
        fa, fb = self.w.fact(a.id, relation), self.w.fact(b.id, relation)
        earlier = self.rng.random() < 0.5
        verb = "founded" if relation == "founded_in" else "published"
        noun = "company" if relation == "founded_in" else "book"
        word = ("earlier" if earlier else "later") if self.rng.random() < 0.5 else ("first" if earlier else "last")
        text = f"Which {noun} was {verb} {word}, {a.name} or {b.name}?"
        winner = a if (int(fa.object) < int(fb.object)) == earlier else b
        key = ("comparison", relation, frozenset((a.id, b.id)), earlier)
        return Question("comparison", text, list(winner.aliases), [fa, fb], key)

    def mixed_3hop(self) -> Question | None:
        kind = self.rng.choice(("work", "company", "person"))
        if kind == "work":
            first = self.w.fact(self.rng.choice(self.works).id, "written_by")
            second = self.w.fact(first.object_id, "born_in")
        elif kind == "company":
            first = self.w.fact(self.rng.choice(self.companies).id, "founded_by")
            second = self.w.fact(first.object_id, "born_in")
        else:
            first = self.w.fact(self.rng.choice(self.people).id, "works_for")
            second = self.w.fact(first.object_id, "headquartered_in")
        third = self.w.fact(second.object_id, self.rng.choice(REAL_RELATIONS))
        return self._chain_question([first, second, third], "mixed_3hop")


def _quota(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of n over the positive weights."""
    total = sum(mix.values())
    raw = {q: n * w / total for q, w in mix.items()}
    counts = {q: math.floor(v) for q, v in raw.items()}
    for q in sorted(raw, key=lambda q: (counts[q] - raw[q], QTYPES.index(q)))[: n - sum(counts.values())]:
        counts[q] += 1
    return counts


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(QTYPES))
    if unknown:
        raise ConfigError(f"prepare.knowledge_world.question_mix: unknown question type(s) {unknown} "
                          f"(known: {', '.join(QTYPES)})")
    bad = {q: w for q, w in mix.items() if not isinstance(w, (int, float)) or w < 0}
    if bad:
        raise ConfigError(f"prepare.knowledge_world.question_mix: weights must be >= 0, got {bad}")
    mix = {q: float(w) for q, w in mix.items() if w > 0}
    if not mix:
        raise ConfigError("prepare.knowledge_world.question_mix: every weight is 0; give at least one type a "
                          "positive weight")
    return mix


def draw_questions(builder: _Builder, n: int, mix: dict[str, float], split: str,
                   avoid_texts: set[str] = frozenset()) -> list[Question]:
    """Exactly n distinct questions, types in proportion to `mix`; an exhausted type's share moves on."""
    out: list[Question] = []
    keys: set[tuple] = set()
    texts = set(avoid_texts)
    active = dict(mix)
    need = n
    while need > 0 and active:
        quota = _quota(need, active)
        for qtype, k in quota.items():
            got, misses = 0, 0
            while got < k and misses < 200:
                q = getattr(builder, qtype)()
                if q is None or q.key in keys or q.text in texts:
                    misses += 1
                    continue
                keys.add(q.key)
                texts.add(q.text)
                out.append(q)
                got += 1
            if got < k:
                log.info("knowledge_world: %s questions exhausted in %s after %d", qtype, split, got)
                active.pop(qtype)
        need = n - len(out)
    if need > 0:
        raise ConfigError(f"prepare.knowledge_world: could only build {len(out)} distinct {split} questions of "
                          f"the {n} asked; add entities (n_people/n_companies/n_works/n_countries) or lower n_{split}")
    builder.rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- probe
@dataclass
class ProbeItem:
    fact_id: str
    question: str
    answers: list[str]


@dataclass
class ProbeResult:
    known: dict[str, bool]  # fact id -> the policy answered it correctly closed-book
    answers: dict[str, str]
    cached: bool = False

    @property
    def known_rate(self) -> float:
        return sum(self.known.values()) / len(self.known) if self.known else 0.0


def probe_items(world: World) -> list[ProbeItem]:
    """One closed-book question per real fact of the world."""
    out = []
    for f in world.real_facts():
        subject = world.entities[f.subject].mention
        out.append(ProbeItem(f.id, QUESTION_TEMPLATES[f.relation][PROBE_TEMPLATE_INDEX].format(s=subject), f.answers))
    return out


def probe(items: Sequence[ProbeItem], answer_fn: AnswerFn, cache_path: str | Path | None = None,
          model_name: str = "", prompt_key: str = "") -> ProbeResult:
    """Ask each item closed-book through `answer_fn`; known = cover-EM of the answer against the golds.

    Answers are cached in a JSON file keyed by (model name, fact-set hash, prompt hash), so a rerun with
    the same policy, facts and prompt does not call `answer_fn` at all. `known` is recomputed from the
    cached answers, so a change of metric never leaves stale flags.
    """
    from searchrl.io import quarantine, read_json, stable_hash, write_json
    from searchrl.metrics import score

    items = list(items)
    facts_hash = stable_hash([(it.fact_id, it.answers) for it in items])
    prompt_hash = stable_hash([[it.question for it in items], prompt_key])
    key = f"{model_name}|{facts_hash}|{prompt_hash}"
    cache: dict = {}
    path = Path(cache_path) if cache_path else None
    if path is not None and path.exists():
        try:
            cache = read_json(path)
            if not isinstance(cache, dict):
                raise ValueError("not a JSON object")
        except (InputError, ValueError, OSError) as err:  # a cache is disposable: recompute rather than fail the stage
            quarantine(path, str(err))
            cache = {}
    entries = cache.get("entries") if isinstance(cache.get("entries"), dict) else {}
    entry = entries.get(key)
    if entry and set(entry.get("answers", {})) >= {it.fact_id for it in items}:
        answers, cached = {it.fact_id: entry["answers"][it.fact_id] for it in items}, True
    else:
        start = time.perf_counter()
        preds = answer_fn([it.question for it in items]) if items else []
        secs = time.perf_counter() - start
        log.info("probe: asked %d questions closed-book in %.1fs (%.1f questions/s)", len(items), secs,
                 len(items) / max(secs, 1e-9))
        if len(preds) != len(items):
            raise ValueError(f"probe: answer_fn returned {len(preds)} answers for {len(items)} questions")
        answers, cached = {it.fact_id: str(p) for it, p in zip(items, preds, strict=True)}, False
        if path is not None:
            entries[key] = {"model": model_name, "facts_hash": facts_hash, "prompt_hash": prompt_hash,
                            "questions": {it.fact_id: it.question for it in items}, "answers": answers}
            write_json(path, {"version": 1, "entries": entries})
    known = {it.fact_id: score(answers[it.fact_id], it.answers)["cem"] >= 1.0 for it in items}
    result = ProbeResult(known, answers, cached)
    log.info("probe: %d/%d real facts known closed-book (%.1f%%)%s", sum(known.values()), len(known),
             100 * result.known_rate, " [cached]" if cached else "")
    return result


# ----------------------------------------------------------------------------- records
def _record(q: Question, rid: str, split: str, world: World, known: dict[str, bool]) -> QARecord:
    hops, gold, names = [], [], []
    for f in q.facts:
        source = "internal" if f.real and known.get(f.id, False) else "external"
        hops.append({"subject": world.entities[f.subject].name, "relation": f.relation, "object": f.object,
                     "source": source, "passage_id": f.passage_id, "fact_id": f.id})
        if f.passage_id not in gold:
            gold.append(f.passage_id)
        for eid in (f.subject, f.object_id):
            if eid and world.entities[eid].name not in names:
                names.append(world.entities[eid].name)
    meta = {
        "qtype": q.qtype, "hops": hops,
        "optimal_retrievals": sum(h["source"] == "external" for h in hops),
        "gold_passage_ids": gold, "gold_titles": sorted({world.entities[f.subject].name for f in q.facts}),
        "entities": names, "fact_ids": [f.id for f in q.facts], **q.extra,
    }
    return QARecord(rid, DATASET, split, q.text, list(q.answers), meta)


def _seen_questions(train: list[Question], train_ids: list[str], world: World, known: dict[str, bool],
                    n: int, rng: random.Random, avoid_texts: set[str]) -> list[Question]:
    """1-hop questions, in a wording no training question used, about external facts of training hops."""
    used_templates: dict[str, set[int]] = {}
    sources: dict[str, list[str]] = {}
    for q, rid in zip(train, train_ids, strict=True):
        if q.one_hop_template:
            used_templates.setdefault(q.one_hop_template[0], set()).add(q.one_hop_template[1])
        for f in q.facts:
            if not (f.real and known.get(f.id, False)):
                sources.setdefault(f.id, [])
                if rid not in sources[f.id]:
                    sources[f.id].append(rid)
    candidates = sorted(sources)
    rng.shuffle(candidates)
    out: list[Question] = []
    for fid in candidates:
        if len(out) >= n:
            break
        f = world.facts[fid]
        subject = world.entities[f.subject].mention
        free = [i for i in range(len(QUESTION_TEMPLATES[f.relation])) if i not in used_templates.get(fid, set())]
        rng.shuffle(free)
        for i in free:
            text = _cap(QUESTION_TEMPLATES[f.relation][i].format(s=subject))
            if text not in avoid_texts:
                qtype = "real_1hop" if f.real else "fictional_1hop"
                out.append(Question(qtype, text, list(f.answers), [f], ("seen", fid),
                                    extra={"seen_from": sources[fid][:20], "seen_template": i}))
                break
    if len(out) < n:
        log.warning("knowledge_world: only %d seen-fact questions possible (n_seen=%d)", len(out), n)
    return out


@dataclass
class KnowledgeWorldData:
    world: World
    train: list[QARecord]
    eval: list[QARecord]
    seen: list[QARecord]
    probe: ProbeResult | None


def generate(cfg, seed: int, answer_fn: AnswerFn | None = None, model_name: str = "",
             prompt_key: str = "") -> KnowledgeWorldData:
    """The whole Knowledge World for a KnowledgeWorldCfg: world, probe (if enabled and answer_fn given), splits."""
    mix = check_mix(cfg.question_mix)
    world = build_world(cfg, seed)
    result = None
    if cfg.probe.enabled:
        if answer_fn is None:
            raise ConfigError("prepare.knowledge_world.probe.enabled is true but no policy was given to probe; "
                              "set probe.enabled: false to treat every hop as external")
        result = probe(probe_items(world), answer_fn, cfg.probe.cache_path, model_name, prompt_key)
    known = result.known if result else {}

    rng = random.Random(f"knowledge-world-questions/{seed}")
    countries = [world.entities[country_id(c)] for c in world.countries]
    order = sorted(countries, key=lambda e: e.id)
    rng.shuffle(order)
    n_eval_c = _split_count(len(order), cfg.eval_entity_fraction) if len(order) > 1 else 0
    eval_c, train_c = order[:n_eval_c], order[n_eval_c:]

    train_q = draw_questions(_Builder(world, "train", train_c, rng), cfg.n_train, mix, "train")
    train_texts = {q.text for q in train_q}
    eval_q = draw_questions(_Builder(world, "eval", eval_c, rng), cfg.n_eval, mix, "eval", train_texts)
    train_ids = [f"kw-train-{i:05d}" for i in range(len(train_q))]
    seen_q = _seen_questions(train_q, train_ids, world, known, cfg.n_seen, rng,
                             train_texts | {q.text for q in eval_q})

    train = [_record(q, rid, "train", world, known) for q, rid in zip(train_q, train_ids, strict=True)]
    evals = [_record(q, f"kw-eval-{i:05d}", "eval", world, known) for i, q in enumerate(eval_q)]
    seen = [_record(q, f"kw-seen-{i:05d}", "seen", world, known) for i, q in enumerate(seen_q)]
    log.info("knowledge_world: %d entities, %d facts, %d passages; questions train %d, eval %d, seen %d",
             len(world.entities), len(world.facts), len(world.passages), len(train), len(evals), len(seen))
    return KnowledgeWorldData(world, train, evals, seen, result)
